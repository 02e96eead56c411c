"""Build a variant's KServe model store: ``python -m scripts.build_kserve_store --variant ti2v-5b [--weights DIR]``."""

from model_store.kserve_store import build_main

if __name__ == "__main__":
    build_main()
