"""The live quality loop: sampling and scoring live answers (``sampling``), the drift monitor with its
alerts and automatic rollbacks (``watch``), and shadow calls to a candidate model (``shadow``)."""
