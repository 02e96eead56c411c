"""The Karmada part of the validator: clusters, the Lua sandbox, the world (placement), overrides,
and the checks built on them."""
