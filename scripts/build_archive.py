"""Build a TorchServe archive of the handler: ``python -m scripts.build_archive --config config/models/ti2v-5b.yaml``."""

from model_store.archive import main

if __name__ == "__main__":
    main()
