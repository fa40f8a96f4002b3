"""The retrieval tests' small knowledge base (markdown and HTML), a question it answers, and ingesting it
through the API."""

from __future__ import annotations

from typing import Any

KB = {
    "fees.md": "# Fees\n\n## Overdraft\n\nAn overdraft costs 35 dollars per item, at most three items a day. "
               "The fee is waived when the balance is restored within 24 hours.\n\n## Wire transfers\n\n"
               "Outgoing domestic wires cost 25 dollars; international wires cost 45 dollars.",
    "cards.md": "# Cards\n\n## Lost or stolen cards\n\nFreeze the card in the app at once, then order a "
                "replacement; it arrives in five business days, or two with express shipping for 15 dollars.\n\n"
                "## Travel notice\n\nTell the bank before travelling abroad so that card payments are not declined.",
    "loans.html": "<html><head><title>Loans</title><script>var x = 1;</script></head><body><h1>Loans</h1>"
                  "<h2>Mortgage rates</h2><p>A 30-year fixed mortgage is offered at 6.1 percent APR.</p>"
                  "<h2>Car loans</h2><p>Car loans run for up to 72 months at 7.4 percent APR.</p></body></html>",
}
ASK = "How much does an overdraft cost?"


async def ingest(gw: Any, headers: dict[str, str], collection: str = "kb", docs: dict[str, str] | None = None,
                 **extra: Any) -> Any:
    await gw.client.post("/v1/collections", headers=headers, json={"name": collection, **extra})
    body = {"documents": [{"source": k, "text": v} for k, v in (docs or KB).items()]}
    return await gw.client.post(f"/v1/collections/{collection}/documents", headers=headers, json=body)
