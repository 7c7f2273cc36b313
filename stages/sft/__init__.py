"""SFT stage: ChatGLM-format chat fine-tuning (full, P-Tuning v2, LoRA) on the training engine."""
