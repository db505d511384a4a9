"""Turn a trained adapter into models that can be served, and measure what each costs.

- :mod:`.merge`: DoRA/LoRA adapter + base → merged full-precision checkpoint (``merge_and_unload``).
- :mod:`.compress`: AWQ / GPTQ W4A16 with llm-compressor (compressed-tensors, what vLLM loads).
- :mod:`.gguf`: merged checkpoint → GGUF (the ``gguf`` package) → Q4_K_M (llama.cpp's own
  quantizer, through llama-cpp-python's bundled libllama).
- :mod:`.perplexity`: token-level NLL on the validation split, greedy generations.
- :mod:`.pipeline`: the whole job for one adapter and several targets, with the quality gate.

Everything here is blocking (torch); the service runs it in a worker thread.
"""
