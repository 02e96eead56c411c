"""Upload a model store to S3: ``python -m scripts.upload_model_store build/kserve/ti2v-5b s3://wan-models/ti2v-5b``."""

from model_store.kserve_store import upload_main

if __name__ == "__main__":
    upload_main()
