"""Golden sets and their checks (the LLM judge among them), the runner, paired comparisons and the
production gate's decision. The gateway runs them through its chat path (``tollway.gateway.evaluating``);
live sampling and drift detection come with the live quality loop."""

if __name__ != "tollway.evals":
    raise ImportError("This folder is Tollway's 'tollway.evals' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'evals'.")
