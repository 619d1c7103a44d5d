"""MkDocs hooks of the documentation site (see mkdocs.yml)."""
