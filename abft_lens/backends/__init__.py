"""Loading models: hooked TransformerLens models, the GGUF cache, the 4-bit bridge and the one forward seam."""
