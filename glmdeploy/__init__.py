"""glmdeploy: declarative multi-GPU deployment of GLM / ChatGLM and Hugging Face causal LMs."""

__version__ = "0.1.0"
