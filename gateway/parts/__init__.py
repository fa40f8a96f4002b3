"""The gateway side of every other part: guards in the chat path (``guarding``), the prompt stage
(``prompting``), retrieval as metered requests (``rag``) and eval runs through the chat path
(``evaluating``). Each talks to its part through the part's face only."""
