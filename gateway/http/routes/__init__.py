"""One module per surface of the API beside the hot endpoints: tenants and keys, budgets and policies,
guards, operations (alerts, changes, routing state), cost reports, prompts (and their git mount),
retrieval, evals, the live quality loop, and ``/metrics``."""
