"""Text to token batches: tokenizer, sources (datasets I/O), resumable tokenizing, blocks, the
per-host loader. Yields numpy; never touches devices.
"""
