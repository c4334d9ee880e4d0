"""Training recipes for peft_sat (run as scripts: `accelerate launch recipes/sft.py`); see recipes/README.md."""
