"""The application beside the library: the ``lorakit`` command and what only it needs.

``cli/`` (the commands), ``training`` (the loop), ``sft`` (chat data to batches), ``lm_loss`` (the chunked
causal-LM loss the loop and the memory planner share), ``memory`` (the planner's byte counts), ``checkpoint``
(resumable training folders), ``embedded`` (the bundled SmolLM2 and chatterbot defaults) and ``hf_trainer``
(a ``transformers.Trainer`` with lorakit's training check). These import the core (``lorakit``); the core
never imports them, so ``import lorakit`` stays free of the app's dependencies (tests/test_layout.py).
"""
