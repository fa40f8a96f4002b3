"""The console at ``/console``: server-rendered pages for finance and operators (``routes``), the queries
behind them (``queries``), inline SVG charts (``charts``) and the Jinja2 templates."""
