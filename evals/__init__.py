"""Golden-set runner, promotion gates, shadow evaluation and drift detection. Not built yet."""

if __name__ != "tollway.evals":
    raise ImportError("This folder is Tollway's 'tollway.evals' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'evals'.")
