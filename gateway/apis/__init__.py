"""The other APIs clients call, each translated into the chat path (``tollway.gateway.chat``) and back so
every part applies unchanged: OpenAI's legacy text completions (``completions``), Anthropic's Messages
(``messages``) and OpenAI's Responses API (``responses``, with the responses it stores in ``stored``)."""
