# Source this on a lent GPU machine (no network there): installs the wheels carried in .whl/*
# into /tmp/site (each folder once per machine) and points Python at them and at the repo.
# The wheels are the ones BENCHMARKS.md lists, downloaded here with `pip download` for cp312.
for dir in .whl/*/; do
  stamp="/tmp/site/.installed-$(basename "$dir")"
  if ls "$dir"*.whl >/dev/null 2>&1 && [ ! -e "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$dir"*.whl && touch "$stamp"
  fi
done
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
# NVLink multicast stays off on shared hosts (the device README says why).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
