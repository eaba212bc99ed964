"""sgl_adapters: SGLang-style front doors (LangChain, DSPy, native SGLang) over one engine."""
