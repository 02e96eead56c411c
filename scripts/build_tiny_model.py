"""Build tiny random-weight Wan2.2 checkpoints offline: ``python -m scripts.build_tiny_model --layout all``."""

from model_store.tiny_model import main

if __name__ == "__main__":
    main()
