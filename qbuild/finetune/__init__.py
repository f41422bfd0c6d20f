"""Finetuning recipes run by the finetune stage: reading a dataset (``data``) and LoRA training (``lora``).

``data`` is plain Python (no torch) until records are tokenised; ``lora`` imports torch and peft inside
its functions only, so planning never pays for them.
"""
