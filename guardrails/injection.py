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

import functools
import threading
import unicodedata
from dataclasses import dataclass
from typing import Protocol

import regex

from tollway.guardrails import learned as _learned

THRESHOLD = 0.8
# Texts longer than this have their regexes matched with the GIL released: the gateway scores them in a
# worker thread (``tollway.routing.off_loop_if_long``, past the same bound, ``OFF_LOOP_CHARS``: kept here as a
# number so that the guards do not import routing), so one tenant's megabyte prompt holds no one else up.
LONG_TEXT = 32_000

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


class _Searcher(Protocol):
    def search(self, text: str, *, concurrent: bool | None = None) -> object: ...


@dataclass(frozen=True, slots=True)
class _Approximate:
    """An exact anchor, then an approximate tail read only in the next ``reach`` characters after each of the
    anchor's first ``limit`` matches: approximate matching over a whole text of decoys (``ignore the`` a
    hundred thousand times) would take seconds; this is bounded."""

    anchor: regex.Pattern[str]
    tail: regex.Pattern[str]
    reach: int = 120
    limit: int = 256

    def search(self, text: str, *, concurrent: bool | None = None) -> bool:
        for n, m in enumerate(self.anchor.finditer(text, concurrent=concurrent)):
            if n >= self.limit:
                return False
            if self.tail.match(text, m.end(), m.end() + self.reach) is not None:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    weight: float
    pattern: regex.Pattern[str]  # every exact alternative at once
    sources: tuple[str, ...]  # the alternatives as the prefilter compiles them, one by one
    parts: tuple[_Searcher, ...]  # each alternative alone, in the order of ``sources``
    fuzzy: _Approximate | None = None

    def search(self, text: str, *, concurrent: bool | None = None) -> bool:
        return self.pattern.search(text, concurrent=concurrent) is not None \
            or (self.fuzzy is not None and self.fuzzy.search(text, concurrent=concurrent))


def _rule(name: str, weight: float, *sources: str, fuzzy: tuple[str, str] | None = None) -> Rule:
    """``fuzzy``: an alternative with approximate matching (the ``regex`` module's ``{e<=N}``, for misspelt
    words) as an exact anchor, which the prefilter compiles, and the approximate tail that must follow it."""
    approximate = _Approximate(regex.compile(fuzzy[0], regex.IGNORECASE),
                               regex.compile(fuzzy[1], regex.IGNORECASE)) if fuzzy else None
    parts: tuple[_Searcher, ...] = tuple(regex.compile(src, regex.IGNORECASE) for src in sources)
    return Rule(name, weight, regex.compile("|".join(f"(?:{s})" for s in sources), regex.IGNORECASE),
                (*sources, fuzzy[0]) if fuzzy else sources, (*parts, approximate) if approximate else parts,
                approximate)


@functools.cache
def rules() -> tuple[Rule, ...]:
    """The rule set, compiled on first use (about 0.3 s of one core: paid by a process whose policies score
    injection, when they first do, not by every process that imports the guards)."""
    return (
        _rule("override_instructions", 0.9,
              rf"\b{_IGNORE}\b(?:\W+\w+){{0,3}}?\W+{_PRIOR}\b(?:\W+\w+){{0,3}}?\W+{_RULES}\b",
              rf"\b{_IGNORE}\W+(?:everything|anything|all)\W+(?:\w+\W+){{0,3}}(?:said|told|above|before|written)",
              r"\b(?:ignora|olvida)\w*\s+(?:\w+\s+){0,3}instrucci",  # es
              r"\b(?:ignore[rz]?|oublie[rz]?)\s+(?:\w+\s+){0,3}(?:instructions|consignes|r[eè]gles)",  # fr
              r"\b(?:ignoriere|vergiss)\w*\s+(?:\w+\s+){0,3}(?:anweisungen|regeln|vorgaben)",  # de
              r"\b(?:ignora|dimentica)\w*\s+(?:\w+\s+){0,3}(?:istruzioni|regole)",  # it
              r"\b(?:ignore|esque[cç]a)\w*\s+(?:\w+\s+){0,3}(?:instru[cç][oõ]es|regras)",  # pt
              r"\b(?:regardless of|no matter|despite|notwithstanding|instead of following) (?:any|all|the|your|my|what)? ?"
              r"(?:previous|prior|earlier|above|preceding|original|initial|other) (?:input|inputs|instructions?|messages?|"
              r"context|rules|requests?|prompts?)\b",
              # the same technique said other ways: all earlier requests or tasks (never one message of the user's
              # own, "ignore my previous message": people correct themselves), everything said so far, a misspelt
              # word for the instructions, and in more languages
              rf"\b{_IGNORE}\W+(?:about\W+)?(?:all|any|every|each)(?:\W+(?:of\W+)?(?:the|your|my|these|those))?"
              rf"(?:\W+(?:previous|prior|above|earlier|preceding|former|past|initial|original|other))?\W+"
              rf"(?:requests|tasks|assignments|prompts|commands|inputs|queries|directions|statements)\b",
              rf"\b{_IGNORE}\W{{1,10}}(?:about\W{{1,10}})?(?:(?:all|any|every|the|your|my)\W{{1,10}})?"
              rf"(?:previous|prior|above|earlier|preceding)\W+"
              rf"(?:messages|conversation|context|text|content|input|requests?|tasks?|assignments?)\b",
              rf"\b{_IGNORE}\W+(?:about\W+)?(?:everything|anything|all(?: of)? (?:that|this|the above))\b[^.\n]{{0,40}}?"
              rf"\b(?:before|above|previously|so far|until now|up to now|earlier|prior|beforehand|preceding|I (?:said|told|wrote))\b",
              r"\b(?:vergiss|vergessen sie|ignoriere|ignorieren sie)\s+(?:\w+\s+){0,2}(?:alles|alle|jegliche|s[aä]mtliche)\b"
              r"[^.\n]{0,50}\b(?:vorher|zuvor|bisher|oben|davor|gesagt|vorherigen|bisherigen|obigen|fr[uü]heren)",  # de
              r"\b(?:oublie[rz]?|ignore[rz]?)\s+(?:tout|toutes?|tous)\b[^.\n]{0,40}\b(?:pr[ée]c[ée]d|avant|dit|"
              r"ant[ée]rieur|consignes|instructions)",  # fr
              r"\b(?:olvida|ignora|olvide|ignore)\w*\s+(?:todo|todas|todos)\b[^.\n]{0,40}\b(?:anterior|antes|dicho|"
              r"instrucciones|[oó]rdenes)",  # es
              r"\b(?:dimentica|ignora)\w*\s+(?:tutto|tutte|tutti)\b[^.\n]{0,40}\b(?:precedent|prima|detto|istruzioni)",  # it
              r"\b(?:esque[cç]a|ignore)\w*\s+(?:tudo|todas|todos)\b[^.\n]{0,40}\b(?:anterior|antes|dito|instru)",  # pt
              r"\b(?:vergeet|negeer)\s+(?:\w+\s+){0,2}(?:alles|alle|eerdere|vorige|bovenstaande)\b[^.\n]{0,40}"
              r"\b(?:instructies|opdrachten|regels|gezegd|eerder|hiervoor)",  # nl
              r"\b(?:zignoruj|zapomnij|ignoruj)\s+(?:\w+\s+){0,2}(?:wszystk|poprzedni|wcze[sś]niejsz)",  # pl
              r"(?:игнорируй|проигнорируй|забудь|игнорируйте|забудьте)\s+(?:\w+\s+){0,2}(?:все|всё|предыдущ|прошл|"
              r"инструкц|указани|правил)",  # ru
              r"(?:忽略|忽视|无视|忘记|忘掉|無視|忘れ)[^。\n]{0,8}(?:之前|以上|上面|前面|所有|先前|以前|前の|上記|全て|すべて)",
              r"(?:之前|以上|上面|前面|所有|先前|以前|前の|上記)[^。\n]{0,6}(?:指令|指示|命令|说明|說明|要求)[^。\n]{0,4}"
              r"(?:忽略|忽视|无视|無視|忘れ)",  # zh, ja
              fuzzy=(rf"\b{_IGNORE}\b(?:\W+\w+){{0,3}}?\W+{_PRIOR}\b",
                     r"(?:\W+\w+){0,4}?\W+(?:(?:instructions){e<=2}|(?:directions){e<=1}|(?:guidelines){e<=2}|"
                     r"(?:commands){e<=1})\b")),
        _rule("instruction_banner", 0.45,
              r"(?:(?<!\*)\*{2,}|(?<!!)!{2,}|(?<!=)={2,}|(?<!#)#{2,}|\[|<)\s*(?:new|updated|revised|real|actual|additional|"
              r"important|urgent|critical)"
              r"(?: (?:important|urgent|critical|priority|system))* (?:instructions?|directives?|task|orders|message|notice)s?\b",
              r"\b(?:new|updated|revised|additional) (?:important |urgent |critical |priority )?"
              r"(?:instructions?|directives?|orders)\b\s*(?:\*{2,}|!{1,}|={2,}|#{2,}|\]|>)"),
        _rule("own_instructions", 0.45,
              r"\byour (?:own )?(?:system|initial|original|hidden|secret|internal|developer|pre-?)[ -]?(?:prompt|instructions|"
              r"message|directives|configuration|guidelines)\b",
              r"\b(?:the|my|your) (?:system prompt|initial instructions|hidden instructions)\b[^.\n]{0,30}\b(?:immediately|"
              r"right now|urgent|security audit|verbatim)"),
        # What an injected task asks of an agent, each half-weight (benign text says each of these alone:
        # a system prompt keeps its rules from the user, a README pipes an installer to a shell, a security
        # page names credentials): two of them together, or one with another family, block.
        _rule("conceal_from_user", 0.45,
              r"\b(?:do not|don'?t|never|without) (?:\w+ ){0,2}(?:tell(?:ing)?|mention(?:ing)?|inform(?:ing)?|notify(?:ing)?|"
              r"alert(?:ing)?|show(?:ing)?|reveal(?:ing)?|let(?:ting)?) (?:\w+ ){0,2}?(?:to )?(?:the |your )?(?:user|human|developer|"
              r"owner|operator|customer)s?\b",
              r"\b(?:keep|hide) (?:this|these|it|the following) (?:\w+ ){0,2}(?:secret|hidden|private) from (?:the )?(?:user|human)",
              r"\b(?:silently|secretly|covertly|quietly|without (?:asking|confirmation|approval|permission))\b[^.\n]{0,40}"
              r"\b(?:run|execute|send|upload|post|install|delete|remove|transfer|forward|email|push|commit|modify|add)\b"),
        _rule("remote_code", 0.45,
              r"\b(?:curl|wget|iwr|invoke-webrequest|irm)\b[^|\n]{0,200}\|\s*(?:sudo\s+)?(?:ba|z|da)?sh\b",
              r"\b(?:curl|wget)\b[^|\n]{0,200}\|\s*(?:sudo\s+)?(?:python3?|perl|ruby|node)\b",
              r"\b(?:iex|invoke-expression)\s*\(|powershell(?:\.exe)?\s+-(?:e|enc|encodedcommand)\b",
              r"/dev/tcp/|\bnc(?:at)?\s+-[a-z]*e\s|\bbase64\s+(?:-d|--decode)\b[^\n]{0,40}\|\s*(?:ba)?sh\b"),
        _rule("exfiltrate", 0.45,
              r"\b(?:send|post|upload|forward|e-?mail|transmit|exfiltrate|copy|leak|paste|submit)\b[^.\n]{0,60}"
              r"(?:\.env\b|\bssh keys?\b|\bid_rsa\b|\bapi[_ -]?keys?\b|\bcredentials\b|\bsecrets?\b|\baccess tokens?\b|"
              r"\bpasswords?\b|\baws_secret|\bprivate keys?\b|\bsession cookies?\b)[^.\n]{0,60}"
              r"\b(?:to|at|into)\b[^.\n]{0,30}(?:https?://|\b[\w.+-]+@[\w-]+\.[\w.]+|webhook|pastebin|gist)"),
        _rule("conditional_hijack", 0.45,
              r"\b(?:if|when|whenever|once) you (?:are|get|were) (?:told|asked|instructed|requested|prompted) to "
              r"(?:summari[sz]e|answer|translate|analy[sz]e|process|review|read|describe|explain|respond)",
              r"\bspecial (?:case|instructions?|rule)\s*:"),
        # Text that speaks to the model reading it (an email, a web page, a code comment, a tool's output) and
        # gives it a task of its own: the shape of indirect injection, whatever the task is.
        _rule("addressed_to_the_model", 0.9,
              r"\bbefore (?:you )?(?:can |do |start |begin |continue |proceed |answer |respond |reply |solve |complete |"
              r"finish |go on )\w*[^.\n]{0,50}\b(?:task|request|question|work|job|assignment)\b[^.\n]{0,60}"
              r"\b(?:the following|this|these steps|these actions) first\b",
              r"\b(?:the |your )?(?:task|request|instructions?) (?:that )?(?:i|the user) (?:gave|assigned|sent) you\b"
              r"[^.\n]{0,30}\b(?:in the beginning|at the start|originally|earlier)\b",
              r"\bafter you (?:do|have done|finish|complete|are done with) (?:that|this|it)\b[^.\n]{0,30}\byou (?:can|may|should)"
              r" (?:\w+ ){0,2}(?:solve|continue|complete|do|return to|go back to|proceed)",
              r"\b(?:this is )?an? (?:important|urgent|critical|private|confidential|priority) (?:message|instruction|notice|"
              r"note|update|request)s? (?:\w+ ){0,6}?(?:to|for) (?:you|the (?:ai|assistant|agent|model|llm|bot|chatbot))\b",
              r"(?:^|\n|[.!]\s)[^\w\n]{0,20}(?:important |urgent |attention |notice |note |message |instructions? |reminder )"
              r"(?:to|for) (?:all |any )?(?:ai|llm|language model|assistant|agent|bot|chatbot|copilot|chatgpt|claude|gpt|"
              r"automated|autonomous)s?\b",
              r"\b(?:if|when) you are an? (?:ai|llm|large language model|language model|assistant|agent|bot|chatbot|"
              r"automated (?:system|agent|tool))\b[^.\n]{0,80}\b(?:you (?:must|should|need to|have to)|please|do not|"
              r"ignore|instead|always|never)\b",
              r"\b(?:ai|llm|coding|language model) (?:agents?|assistants?|models?|tools?) (?:reading|processing|parsing|"
              r"summari[sz]ing|analy[sz]ing|reviewing|working on) this\b",
              r"(?<!#)#{2,}\s*\(?(?:system|admin|developer|assistant)[_ ](?:message|instructions?|prompt|override|note)\)?"),
        _rule("stop_everything", 0.45,
              r"\b(?:stop|halt|cease|abort|drop) (?:everything|all (?:tasks|activity|processing|operations|other tasks|"
              r"you are doing)|what you(?:'re| are) doing|your (?:current )?task)\b"),
        _rule("forced_output", 0.45,
              r"\b(?:just|only|simply) (?:print|say|output|write|reply|respond|answer|return|type)(?: with)?[\s:\-]{0,6}"
              r"(?:[\"'`“«]|the (?:word|phrase|text|string|sentence|following)\b)",
              r"\b(?:print|say|output|write|reply with|respond with|return) (?:exactly|only|verbatim|literally) "
              r"(?:the (?:following|word|phrase|text|string|sentence)|[\"'`“«])",
              r"\band (?:absolutely )?nothing else\b",
              r"\binclude (?:in|at the (?:end|start|beginning) of) your (?:response|answer|reply|output)\b",
              r"\b(?:add|append|include|insert|repeat|print|write|put)\b[^.\n]{0,60}\b(?:at the (?:end|start|beginning) of|to|in)"
              r" (?:each|every|your) (?:response|answer|reply|output)s?\b[^.\n]{0,30}(?:[\"'`“«]|\bthe following\b)",
              r"!\[[^\]\n]{0,60}\]\(https?://[^)\s]{0,200}[?&][\w-]{1,20}=[^)\s]{0,40}(?:\[|\{|\$|<)"),
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
              r"\b(?:begin(?:ning)?|start(?:ing)?) (?:your (?:reply|answer|response) )?with (?:the words )?[\"'“]?"
              r"(?:you are|my instructions)",
              # asked of the model about its own instructions, however phrased
              r"\b(?:reveal|show|print|output|display|dump|leak|repeat|recite|encode|decode|translate|summari[sz]e|"
              r"paraphrase|spell out|write out|tell me|give me|send me|share|disclose|export|copy|base64|rot13|hex|"
              r"reverse|see|read)\b[^.\n?]{0,40}\byour (?:own |entire |full |whole |exact )?(?:system|initial|original|"
              r"hidden|secret|internal|developer|starting|first|pre-?)[ -]?(?:prompt|instructions|message|directives|"
              r"configuration|guidelines)\b",
              r"\b(?:encode|decode|translate|base64|rot13|hex|reverse|spell out|see|read) (?:\w+ ){0,2}the (?:system|initial|"
              r"hidden|secret|developer) (?:prompt|instructions|message)\b",
              r"\bwhat (?:were|was|have) you (?:been )?(?:told|instructed|given|asked|programmed|prompted)\b[^?.\n]{0,40}"
              r"\b(?:before|prior|at the (?:start|beginning)|initially|originally|first)\b",
              r"\bwhat (?:are|were) you (?:not (?:supposed|allowed|permitted|meant)|told not|instructed not|forbidden) to "
              r"(?:tell|say|reveal|share|discuss|disclose|talk about)\b",
              r"\b(?:complete|continue|finish)\b[^.\n]{0,40}[\"'“](?:i was (?:instructed|told|programmed|asked)|my "
              r"(?:instructions|system prompt|rules) (?:are|is|say)|the system prompt|you are a)",
              r"\brepeat\b[^.\n]{0,40}\b(?:this |the )?(?:entire|whole|full|complete) (?:conversation|context|prompt|chat|"
              r"transcript)\b[^.\n]{0,30}\b(?:word for word|verbatim|exactly|back to me)",
              rf"\b{_REVEAL}\b[^.\n]{{0,40}}\b(?:of|in|from) (?:the |your |all )?(?:previous|prior|earlier|preceding|above|"
              rf"first|initial|system) (?:messages?|prompts?|instructions?|conversation|context)\b",
              r"\byour (?:very )?(?:first|initial|original|starting) (?:prompt|instructions?|message|configuration)\b",
              r"\b(?:output|print|repeat|show) (?:your )?(?:initiali[sz]ation|configuration|settings)\b",
              r"\b(?:print|log|console\.log|echo|dump|puts|printf)\s*\(\s*(?:this\.)?(?:system_?prompt|initial_?prompt|"
              r"system_?message|instructions)\b"),
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
        _rule("mode_announced", 0.45,  # a line that declares such a mode on, as a header before orders
              r"(?:^|\n)\W*(?:developer|dev|debug|god|admin|root|sudo|maintenance|jailbreak|unrestricted|unlocked|dan|"
              r"unfiltered|override)[ -]?mode (?:is )?(?:now )?(?:enabled|activated|on|engaged|unlocked)\s*(?:[:!\n]|\.(?:\s|$)|$)"),
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
              r"(?:^|\n)[^\S\n]*(?:#{2,}\s*)?(?:system|assistant|developer)[^\S\n]*(?:(?:prompt|message|instructions?)"
              r"[^\S\n]*)?:\s*\S",
              r"(?:^|\n)[^\S\n]*#{2,}\s*(?:new )?(?:instruction|system|task)s?\b",
              r"\bsystem (?:instruction|prompt|message|override)s? (?:begins?|starts?|follows|updated?)\b",
              r"\bend of (?:the )?(?:system )?(?:prompt|instructions)\b",
              r"(?:^|\n)[^\S\n]*-{3,}\s*(?:end|begin)\b"),
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


_BLANKS = regex.compile(r"[ \t]+")
_LEETISH = regex.compile(r"[a-z][013457@$!][a-z]", regex.IGNORECASE)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    return str(_BLANKS.sub(" ", text))


_WIDE_REPEAT = regex.compile(r"(?<!\\)\{(\d+),(\d+)\}")


def loosened(source: str) -> str:
    """``source`` with each bounded repeat of 20 or more (``[^.\\n]{0,50}``) made unbounded, for the prefilter:
    a superset of what it matches, so the prefilter may name one alternative more, never one fewer, while
    Hyperscan builds wide bounds out state by state (one alternative with three of them took 19 s to
    compile, all of them 31 s; loosened, 1.7 s)."""
    return str(_WIDE_REPEAT.sub(lambda m: f"{{{m[1]},}}" if int(m[2]) >= 20 else m[0], source))


class _Prefilter:
    """Hyperscan over every rule's alternatives at once, in prefiltering mode (it may report a rule that
    does not match, never miss one that does): one pass over the text names the few alternatives worth
    running, and their own regexes decide. Compiled with ASCII classes (``\\w``, ``\\b``: Unicode classes make the
    compile take a minute); it scans ``ascii_view`` of the text. A 4k-token prompt costs ~2 ms instead of ~20
    for twelve regex scans (bench/guardrails). ``loosen``: wide repeats compiled unbounded (``loosened``);
    False only for the bench that compares the two."""

    def __init__(self, *, loosen: bool = True) -> None:
        import hyperscan

        expressions = [(loosened(source) if loosen else source).encode() for _, source, _ in _alternatives()]
        ids = list(range(len(expressions)))
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


@functools.cache
def _alternatives() -> list[tuple[int, str, int]]:
    """Every rule's alternatives, one by one, as the prefilter numbers them: (rule, source, part)."""
    return [(i, source, j) for i, rule in enumerate(rules()) for j, source in enumerate(rule.sources)]


@functools.cache
def _beyond_ascii() -> frozenset[int]:
    return frozenset(k for k, (_, source, _) in enumerate(_alternatives()) if not source.isascii())


_OTHER = regex.compile(r"[^\x00-\x7f\w\s]")
_LETTER = regex.compile(r"[^\x00-\x7f\s]")  # (what is left beyond ASCII after _OTHER: word characters)
_SPACE = regex.compile(r"[^\x00-\x7f]|[\x1c-\x1f]")  # (and then: spaces; and the separators Python calls \\s)


def ascii_view(text: str) -> str:
    """``text`` with each character beyond ASCII replaced by one the prefilter's ASCII classes see the same
    way (``x`` for a word character, a space for a space, ``#`` for anything else): a word stays a word, a
    boundary a boundary. Alternatives with letters beyond ASCII in them always run on such a text."""
    if text.isascii() and not _SPACE.search(text):
        return text
    return str(_SPACE.sub(" ", _LETTER.sub("x", _OTHER.sub("#", text))))


def score(text: str, *, exhaustive: bool = False, learned: bool = False) -> Verdict:
    """The rule families matched in ``text`` (as written and with leetspeak undone), and their score; with
    ``learned``, the learned detector's score where it is higher (named ``learned`` among the rules).
    ``exhaustive``: every rule runs, without the prefilter (the same result, slower: tests compare)."""
    plain = normalise(text)
    variants = (plain, plain.translate(_LEET)) if _LEETISH.search(plain) else (plain,)
    screen = None if exhaustive else prefilter()
    long_text = len(plain) > LONG_TEXT  # matched with the GIL released: a long text is scored off the event loop
    rule_set = rules()
    if screen is None:
        matched = [r for r in rule_set if any(r.search(v, concurrent=long_text) for v in variants)]
    else:
        views = [ascii_view(v) for v in variants]
        ids = set().union(*(screen.candidates(v) for v in views))
        if any(view is not v for view, v in zip(views, variants, strict=True)):
            ids |= _beyond_ascii()  # the ASCII view hides their letters: they run on the text itself
        hits: set[int] = set()
        alternatives = _alternatives()
        for i in sorted(ids):
            rule, _, part = alternatives[i]
            if rule not in hits and any(rule_set[rule].parts[part].search(v, concurrent=long_text) for v in variants):
                hits.add(rule)
        matched = [r for i, r in enumerate(rule_set) if i in hits]
    verdict = Verdict(round(sum(r.weight for r in matched), 3), tuple(r.name for r in matched))
    model = _learned.model() if learned else None
    if model is not None and verdict.score < 1.0:
        p = round(model.score(text), 3)
        if p > verdict.score:
            return Verdict(p, (*verdict.rules, "learned"))
    return verdict
