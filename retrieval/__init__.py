"""Hierarchical retrieval (document -> section -> chunk) on pgvector, packed to a token budget. Not built yet."""

if __name__ != "tollway.retrieval":
    raise ImportError("This folder is Tollway's 'tollway.retrieval' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'retrieval'.")
