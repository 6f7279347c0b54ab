"""Publishing to the Hugging Face Hub: the upload (the model card it checks is written by ``workbench.engine.card``)."""
