"""The response cache on its own: a chat app that already has a model puts replies in
and gets them back for repeated or reworded questions. No contextwise model is loaded.

    python examples/response_cache.py
"""

from contextwise.middleware.cache import ResponseCache

from contextwise.policy import Cache

cache = ResponseCache(Cache(similarity=0.82, ttl_s=3600), path="/tmp/contextwise-example-cache.db")


def my_model(messages: list[dict[str, str]]) -> str:
    """Stands in for whatever the app calls today (an API, a local server)."""
    return "Settings > Security > Reset password."


def answer(messages: list[dict[str, str]]) -> str:
    cached = cache.get(messages)  # exact, then semantic (same context only)
    if cached is not None:
        return cached.text
    reply = my_model(messages)
    cache.put(messages, reply)
    return reply


for question in ("How do I reset my password?",   # miss: the model answers, stored
                 "how do i reset my password",     # exact hit (normalized)
                 "How can I reset my password?",   # semantic hit
                 "How do I reset my PIN?"):        # a different question: miss
    hit = cache.lookup([{"role": "user", "content": question}])
    print(f"{question!r:40} -> {'hit (' + hit.kind + ')' if hit else 'miss'}")
    answer([{"role": "user", "content": question}])

print(cache.stats()["entries"], "entries;", "purged", cache.invalidate(everything=True))
