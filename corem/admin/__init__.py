"""The operator's side over HTTP."""
