"""Tasks (StaICC datasets, CSV/JSONL) and ICL prompts built segment by segment."""
