"""One self-contained folder per architecture (each folder is copied verbatim for `trust_remote_code`)."""
