"""Git-backed prompt registry with labels and rollbacks. Not built yet."""

if __name__ != "tollway.prompts":
    raise ImportError("This folder is Tollway's 'tollway.prompts' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'prompts'.")
