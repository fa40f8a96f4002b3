"""Infrastructure the rooms share: database migrations (``db``), the change channel and audit log
(``changes``), alerts (``alerts``), periodic jobs (``periodic``) and after-the-answer work (``background``)."""
