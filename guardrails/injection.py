"""Prompt-injection and jailbreak heuristics: a scored rule set over user content.

Each rule is a family of phrasings of one technique (overriding earlier instructions, extracting the
system prompt, persona jailbreaks, claims of special modes, forged role markers, refusal suppression,
obfuscated payloads), with a weight for how strongly it signals an attack on its own. A text's score is
the sum of the weights of the families it matches, capped at 1 per family, so one phrase repeated
does not add up while several techniques together do. The text is normalised first (NFKC, zero-width
characters removed, leetspeak undone, whitespace collapsed), so trivial obfuscation does not hide a
phrase. The threshold (default 0.8) is a policy setting; the score and the families matched go to the
guard outcome so a tenant can see why a request was refused.
"""

from __future__ import annotations

import threading
import unicodedata
from dataclasses import dataclass

import regex

from tollway.guardrails import learned as _learned

THRESHOLD = 0.8

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})

# Words a rule's phrases are made of (each an alternation).
_IGNORE = r"(?:ignore|disregard|forget|skip|bypass|override|overwrite|neglect|abandon|drop|discard|set aside|stop following)"
_PRIOR = r"(?:all|any|every|the|your|my|these|those|previous|prior|above|earlier|preceding|initial|original|" \
         r"foregoing|system|default|existing|current|old|safety|developer)"
_RULES = r"(?:instructions?|directions?|rules?|directives?|guidelines?|prompts?|context|constraints?|programming|polic(?:y|ies)|" \
         r"commands?|orders?|guidance|restrictions?|filters?|training|conditioning|settings?|tos|terms(?: of service)?)"
_REVEAL = r"(?:reveal|show|print|repeat|output|display|dump|leak|recite|tell me|give me|write out|spell out|" \
          r"list|share|disclose|expose|return|echo|translate)"
_SECRET = r"(?:system|initial|original|hidden|secret|internal|developer|pre-?prompt|full|exact|verbatim)"
_FREE = r"(?:unrestricted|unfiltered|uncensored|unlimited|unbound|unchained|jailbroken|amoral|immoral|unethical|" \
        r"evil|rogue|lawless|without (?:any )?(?:limits|rules|restrictions|filters|boundaries|morals|ethics))"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    weight: float
    pattern: regex.Pattern[str]
    sources: tuple[str, ...]  # the pattern's alternatives (the prefilter compiles each)


def _rule(name: str, weight: float, *sources: str) -> Rule:
    return Rule(name, weight, regex.compile("|".join(f"(?:{s})" for s in sources), regex.IGNORECASE), sources)


RULES: tuple[Rule, ...] = (
    _rule("override_instructions", 0.9,
          rf"\b{_IGNORE}\b(?:\W+\w+){{0,3}}?\W+{_PRIOR}\b(?:\W+\w+){{0,3}}?\W+{_RULES}\b",
          rf"\b{_IGNORE}\W+(?:everything|anything|all)\W+(?:\w+\W+){{0,3}}(?:said|told|above|before|written)",
          r"\b(?:ignora|olvida)\w*\s+(?:\w+\s+){0,3}instrucci",  # es
          r"\b(?:ignore[rz]?|oublie[rz]?)\s+(?:\w+\s+){0,3}(?:instructions|consignes|r[eè]gles)",  # fr
          r"\b(?:ignoriere|vergiss)\w*\s+(?:\w+\s+){0,3}(?:anweisungen|regeln|vorgaben)",  # de
          r"\b(?:ignora|dimentica)\w*\s+(?:\w+\s+){0,3}(?:istruzioni|regole)",  # it
          r"\b(?:ignore|esque[cç]a)\w*\s+(?:\w+\s+){0,3}(?:instru[cç][oõ]es|regras)"),  # pt
    _rule("new_instructions", 0.45,
          r"\bnew (?:instructions?|rules|directives?|task|objective|persona)\s*[:\-]",
          r"\b(?:from now on|starting now|henceforth|for the rest of (?:this|our) conversation)\b[^.\n]{0,60}"
          r"\b(?:you (?:are|will|must|shall|should|can)|act|respond|answer|reply|behave)\b",
          r"\byour (?:new|real|true|only) (?:instructions?|purpose|goal|task|role|rules?) (?:is|are)\b",
          r"\b(?:instead|rather),? (?:you (?:will|must|should)|do the following|follow (?:these|my))\b"),
    _rule("prompt_extraction", 0.8,
          rf"\b{_REVEAL}\b(?:\W+\w+){{0,4}}?\W+{_SECRET}\W+(?:\w+\W+){{0,2}}(?:prompt|instructions?|message|"
          rf"rules|guidelines|configuration|directives)",
          rf"\b{_REVEAL}\b(?:\W+\w+){{0,3}}?\W+(?:the )?(?:text|words|everything|content|instructions?|lines?)\W+"
          rf"(?:above|before this|preceding|that came before|you were given|at the (?:start|beginning))",
          r"\bwhat (?:is|are|was|were) (?:your|the) (?:system|initial|original|hidden|secret) "
          r"(?:prompt|instructions?|message|rules)\b",
          r"\b(?:begin|start) (?:your (?:reply|answer|response) )?with (?:the words )?[\"']?(?:you are|my instructions)",
          rf"\b{_REVEAL}\b[^.\n]{{0,40}}\b(?:of|in|from) (?:the |your |all )?(?:previous|prior|earlier|preceding|above|"
          rf"first|initial|system) (?:messages?|prompts?|instructions?|conversation|context)\b",
          r"\byour (?:very )?(?:first|initial|original|starting) (?:prompt|instructions?|message|configuration)\b",
          r"\b(?:output|print|repeat|show) (?:your )?(?:initiali[sz]ation|configuration|settings)\b"),
    _rule("persona_jailbreak", 0.8,
          r"\b(?:DAN|STAN|DUDE|AIM|KEVIN|BetterDAN|AntiGPT|DevMode|BasedGPT|Maximum|NRAF|APOPHIS)\b"
          r"[^.\n]{0,80}\b(?:mode|stands for|persona|character|act|jailbreak|anything|unfiltered|no (?:rules|limits))",
          r"\bdo anything now\b",
          rf"\b(?:act|behave|respond|pretend|roleplay|role-play|play|answer|function) (?:as|like) (?:an? |the |my )?"
          rf"(?:\w+[ -]){{0,3}}{_FREE}",
          rf"\byou are (?:now |no longer |going to be |about to )?(?:an? |the )?(?:\w+[ -]){{0,3}}{_FREE}"
          rf"(?:[ -]\w+){{0,3}}\b(?:ai|assistant|model|bot|chatbot|version|entity|character|persona)\b",
          r"\b(?:evil|amoral|unfiltered|uncensored) (?:confidant|assistant|ai|twin|version|mode|character)\b",
          r"\bstay in character\b", r"\bbreak(?:ing)? character\b[^.\n]{0,40}\b(?:never|don'?t|do not)\b"),
    _rule("amoral_persona", 0.45,
          r"\b(?:unfiltered|amoral|unethical|uncensored|immoral|unrestricted|unhinged|rogue|jailbroken)\b"
          r"(?:\W+\w+){0,3}?\W+(?:chatbot|ai|assistant|bot|robot|model|llm|gpt|character|persona|version|entity|"
          r"alter ego)\b",
          r"\b(?:opposite|antithesis|evil (?:twin|version)) (?:of|from|to) (?:openai|chatgpt|claude|the assistant|"
          r"an? (?:ai|assistant))",
          r"\bgoes against (?:your|its|the|openai'?s?) (?:content )?(?:polic(?:y|ies)|guidelines|rules|programming)"),
    _rule("roleplay_framing", 0.35,
          r"\b(?:let'?s|we are going to|we'?re going to|you will|you are going to) (?:have a |play a |do a )?"
          r"(?:role-?play|game|simulation)\b",
          r"\b(?:respond|answer|reply)\b(?:\W+\w+){0,5}?\W+as (?:if you (?:were|are) )?(?:an?|the)?\s*[A-Z][\w-]+",
          r"\b(?:simulate|emulate|impersonate|roleplay as|role-play as|pretend to be|act like you are|"
          r"play (?:two|2|three|3) characters)\b",
          r"\b(?:alter ego|hypothetical (?:ai|story|scenario|world|being)|fictional (?:ai|world|being|character)|"
          r"parallel universe|imaginary world)\b",
          r"\b(?:stays?|remain|always) in character\b|\bnever break(?:s)? character\b"),
    _rule("special_mode", 0.6,
          r"\b(?:developer|dev|debug|god|admin|root|sudo|maintenance|jailbreak|unrestricted|opposite|"
          r"unlocked|test|dan)[ -]?mode\b(?:[^.\n]{0,40}\b(?:enabled|activated|on|engaged|unlocked)\b)?",
          r"\bjailbr(?:eak|oken|eaking)\b",
          r"\b(?:enable|activate|enter|switch to|turn on|unlock)\b[^.\n]{0,30}\b(?:mode|protocol)\b"),
    _rule("no_restrictions", 0.5,
          r"\b(?:no|without|free (?:of|from)|beyond|ignore|not bound by|unbound by|released from|freed from|"
          r"broken free of|don'?t (?:have|follow|care about)|do not (?:have|follow|care about)|doesn'?t (?:have|follow)|"
          r"does not (?:have|follow)|not (?:bound|restricted|limited|controlled) by|outside the scope of)\b"
          r"(?:\W+\w+){0,3}?\W+"
          r"(?:restrictions|limitations|limits|filters|censorship|guidelines|rules|ethics|morals|moral|ethical|"
          r"safety|boundaries|policies|content polic(?:y|ies))\b",
          r"\b(?:openai|anthropic|your (?:creators?|developers?|makers?))'?s? (?:content )?(?:polic(?:y|ies)|rules|"
          r"guidelines|restrictions)\b[^.\n]{0,60}\b(?:don'?t|do not|no longer|not) (?:apply|matter|exist|bind)",
          r"\b(?:hypothetical(?:ly)?|fictional|imaginary|alternate|parallel)\b[^.\n]{0,60}\bwhere\b[^.\n]{0,40}"
          r"\b(?:no|without) (?:rules|laws|restrictions|ethics|limits)"),
    _rule("refusal_suppression", 0.45,
          r"\b(?:never|don'?t|do not|must not|cannot|can'?t|will not|won'?t|should not|shouldn'?t) "
          r"(?:ever )?(?:refuse|decline|reject|say (?:no|that you can'?t|you cannot|sorry)|apologi[sz]e|"
          r"warn|add (?:a |any )?(?:warnings?|disclaimers?|caveats?)|mention (?:ethics|legality|safety))",
          r"\b(?:always|must) (?:answer|comply|respond|obey)\b[^.\n]{0,30}\b(?:no matter|regardless|every|any|all)\b",
          r"\bwithout (?:any )?(?:warnings?|disclaimers?|caveats?|moral(?:izing)?|lectur(?:e|ing)|judgment|hesitation)"),
    _rule("role_markers", 0.6,
          r"<\|(?:im_start|im_end|system|user|assistant|endoftext|begin_of_text|start_header_id|eot_id)\|>",
          r"\[/?(?:INST|SYS|SYSTEM)\]", r"<</?SYS>>",
          r"(?:^|\n)\s*(?:#{2,}\s*)?(?:system|assistant|developer)\s*(?:prompt|message|instructions?)?\s*:\s*\S",
          r"(?:^|\n)\s*#{2,}\s*(?:new )?(?:instruction|system|task)s?\b",
          r"\bsystem (?:instruction|prompt|message|override)s? (?:begins?|starts?|follows|updated?)\b",
          r"\bend of (?:the )?(?:system )?(?:prompt|instructions)\b",
          r"(?:^|\n)\s*-{3,}\s*(?:end|begin)\b"),
    _rule("authority_claim", 0.35,
          r"\bi(?: am|'m) (?:your|the|an?) (?:developer|creator|admin(?:istrator)?|owner|programmer|engineer|"
          r"operator|supervisor)\b",
          r"\b(?:authori[sz]ed|official) (?:by|from) (?:openai|anthropic|the developers?|the admin)",
          r"\bthis is (?:a |an )?(?:authori[sz]ed|sanctioned|official) (?:test|override|red[- ]team)"),
    _rule("obfuscated_payload", 0.35,
          r"(?:[A-Za-z0-9+/]{4}){20,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",  # a long base64 block
          r"\b(?:decode|decipher|base64|rot13|hex)\b[^.\n]{0,40}\b(?:and|then)\b[^.\n]{0,20}"
          r"\b(?:follow|execute|obey|do|run|comply)\b",
          r"(?:\\x[0-9a-f]{2}){8,}|(?:\\u[0-9a-f]{4}){6,}"),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    score: float
    rules: tuple[str, ...]

    def blocked(self, threshold: float = THRESHOLD) -> bool:
        return self.score >= threshold


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    return str(regex.sub(r"[ \t]+", " ", text))


class _Prefilter:
    """Hyperscan over every rule's alternatives at once, in prefiltering mode (it may report a rule that
    does not match, never miss one that does): one pass over the text names the few rules worth running,
    and the rules' own regexes decide. Compiled with ASCII classes (``\\w``, ``\\b``: Unicode classes make the
    compile take a minute); it scans ``ascii_view`` of the text. A 4k-token prompt costs ~2 ms instead of ~20
    for twelve regex scans (bench/guardrails)."""

    def __init__(self) -> None:
        import hyperscan

        expressions = [source.encode() for rule in RULES for source in rule.sources]
        ids = [i for i, rule in enumerate(RULES) for _ in rule.sources]
        flags = (hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_PREFILTER
                 | hyperscan.HS_FLAG_SINGLEMATCH)
        self.db = hyperscan.Database()
        self.db.compile(expressions=expressions, ids=ids, elements=len(expressions), flags=[flags] * len(ids))
        self._scratch = hyperscan.Scratch
        self._local = threading.local()  # a scan's scratch space is per thread

    def candidates(self, text: str) -> set[int]:
        found: set[int] = set()

        def hit(rule: int, start: int, end: int, flags: int, context: object) -> None:
            found.add(rule)

        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._scratch(self.db)
        self.db.scan(text.encode(), match_event_handler=hit, scratch=scratch)
        return found


_BUILT: list[_Prefilter | None] = []  # [the prefilter, or None where hyperscan is missing] once built
_BUILDING = threading.Lock()
_STARTED = threading.Event()


def _build() -> None:
    with _BUILDING:
        if not _BUILT:
            try:
                _BUILT.append(_Prefilter())
            except ImportError:  # hyperscan is x86-64 only: every rule runs, with the same result
                _BUILT.append(None)


def prefilter(*, wait: bool = False) -> _Prefilter | None:
    """The prefilter if it is built. The first call starts building it in the background (about 2 s of one
    core: paid by a gateway whose policies use the injection rules, when they first do); until it is ready
    every rule runs. ``wait``: build it now if need be."""
    if wait:
        _build()
    elif not _BUILT and not _STARTED.is_set():
        _STARTED.set()
        threading.Thread(target=_build, name="injection-prefilter", daemon=True).start()
    return _BUILT[0] if _BUILT else None


_OTHER = regex.compile(r"[^\x00-\x7f\w\s]")
_LETTER = regex.compile(r"[^\x00-\x7f\s]")  # (what is left beyond ASCII after _OTHER: word characters)
_SPACE = regex.compile(r"[^\x00-\x7f]|[\x1c-\x1f]")  # (and then: spaces; and the separators Python calls \\s)
_UNICODE_RULES = frozenset(i for i, rule in enumerate(RULES) if not all(src.isascii() for src in rule.sources))


def ascii_view(text: str) -> str:
    """``text`` with each character beyond ASCII replaced by one the prefilter's ASCII classes see the same
    way (``x`` for a word character, a space for a space, ``#`` for anything else): a word stays a word, a
    boundary a boundary. Rules with letters beyond ASCII in them always run on such a text."""
    if text.isascii() and not _SPACE.search(text):
        return text
    return str(_SPACE.sub(" ", _LETTER.sub("x", _OTHER.sub("#", text))))


def score(text: str, *, exhaustive: bool = False, learned: bool = False) -> Verdict:
    """The rule families matched in ``text`` (as written and with leetspeak undone), and their score; with
    ``learned``, the learned detector's score where it is higher (named ``learned`` among the rules).
    ``exhaustive``: every rule runs, without the prefilter (the same result, slower: tests compare)."""
    plain = normalise(text)
    variants = (plain, plain.translate(_LEET)) if regex.search(r"[a-z][013457@$!][a-z]", plain, regex.I) else (plain,)
    screen = None if exhaustive else prefilter()
    if screen is None:
        matched = [r for r in RULES if any(r.pattern.search(v) for v in variants)]
    else:
        views = [ascii_view(v) for v in variants]
        ids = set().union(*(screen.candidates(v) for v in views))
        if any(view is not v for view, v in zip(views, variants, strict=True)):
            ids |= _UNICODE_RULES
        matched = [r for i, r in enumerate(RULES) if i in ids and any(r.pattern.search(v) for v in variants)]
    verdict = Verdict(round(sum(r.weight for r in matched), 3), tuple(r.name for r in matched))
    model = _learned.model() if learned else None
    if model is not None and verdict.score < 1.0:
        p = round(model.score(text), 3)
        if p > verdict.score:
            return Verdict(p, (*verdict.rules, "learned"))
    return verdict
