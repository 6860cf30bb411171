"""Synthetic corpora with real identity structure, for tests and the quickstarts: faces and speech."""
