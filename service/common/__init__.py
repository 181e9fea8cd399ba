"""What every layer shares: errors, the closed sets of names, logging, the tokenizer, the packaged model."""
