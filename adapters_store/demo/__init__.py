"""Demo LoRA adapters for the default model (SmolLM2-135M-Instruct).

Three PEFT adapters with behaviours anyone can see, each in its own folder:
``shout`` (answers in capital letters), ``json`` (answers as ``{"answer": "..."}``)
and ``terse`` (one short sentence). ``behaviours`` holds the checks and the held-out
prompts; ``train`` rebuilds the adapters (``make demo-adapters``).
"""
