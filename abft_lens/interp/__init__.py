"""Looking at heads: attention capture at hook_pattern, the induction filter, head scores."""
