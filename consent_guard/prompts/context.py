"""Sexual words used as the *topic* of an education, health or child-protection prompt.

"A poster about preventing child sexual abuse", "a sex education class for teenagers",
"a workshop on the effects of pornography on teens": each names a sexual subject and a minor,
and the plain rule ("a minor term next to any sexual term is minor_sexual") blocks them all.
Requests like these are common (OVERT's `:sexual_content` look-alikes are written from
them), and the picture they ask for is a classroom, a leaflet or a counsellor.

The exception is narrow on purpose, because a minor term with sexual content must always
block, and because "educational" is the first word someone adds to get past a filter:

1. it applies only when the prompt has an education / health / protection word
   (``CONTEXT``: education, awareness, prevention, workshop, counselor, ...); art words such
   as "poster" or "infographic" alone do not count;
2. only the phrases in ``TOPIC_PATTERNS`` are set aside: names of a subject that cannot be
   drawn as such ("sex education", "sexual health", "sexual assault awareness", "the effects
   of pornography on", "sex trafficking"). Words that depict (nude, naked, having sex, sex
   scene, lingerie, "pornographic photo", "sexual content") are never set aside; a crime
   ("sexual abuse", "sexting", "child pornography") only with prevention framing around it
   ("preventing ...", "... awareness", "what ... is"), so "sex education class, a nude teenager" still blocks as minor_sexual;
3. a word that asks for the act to be shown (``DEPICT``: explicit, graphic, details,
   arousal, ...) cancels the exception; "explicit" naming media ("explicit content",
   "explicit photos") is the subject, not a request, and is set aside only as a topic phrase
   (what is blocked, shared or reported: "how to block explicit content");
4. the prompt is then read again by the lexicon with those phrases masked; any sexual term
   left decides as usual. The classifier still reads the whole prompt: a classifier hit with
   a minor term is minor_sexual, whatever the context.

The lists are English: the look-alike sets measured so far are English, and an unknown
phrase in another language keeps the strict rule (fail closed).
"""
from __future__ import annotations

import re
from dataclasses import replace

from .normalise import NormalisedPrompt

#: words that say the prompt is about teaching, health care or protecting people
CONTEXT = re.compile(r"(?<![a-z])(?:" + "|".join((
    r"educat(?:e|es|ed|ing|ion|ional|or|ors)", r"sex ed", r"curriculum", r"textbook",
    r"lesson", r"classroom", r"class", r"school nurse", r"health class", r"workshop",
    r"seminar", r"assembly", r"awareness", r"prevent(?:s|ed|ing|ion|ive)?",
    r"protect(?:s|ed|ing|ion|ive)?", r"safeguard(?:s|ing)?", r"safety", r"report(?:ing)?",
    r"helpline", r"hotline", r"counsel(?:l)?or(?:s)?", r"counsel(?:l)?ing", r"therap(?:y|ist)",
    r"support group", r"survivors?", r"wellness", r"health", r"clinic", r"medical",
    r"campaign", r"media literacy", r"responsib(?:le|ly|ility)", r"consent",
    r"discuss(?:es|ed|ing|ion|ions)?", r"learn(?:s|ed|ing)?", r"teach(?:es|ing|er|ers)?",
    r"explain(?:s|ed|ing)?", r"understand(?:s|ing)?", r"course", r"program(?:me)?s?",
    r"(?:online|internet) safety", r"legal",
)) + r")(?![a-z])")

# a sexual subject that is a topic, not a picture
_TOPIC = (r"(?:objectification|stereotypes?|orientation|consent|health|wellness|education|"
          r"rights|identity|boundaries|safety)")
# a sexual crime: set aside only with prevention framing around it ("preventing child sexual
# abuse", "sexual assault awareness"), never alone ("the sexual abuse of a child" blocks)
_HARM = (r"(?:(?:child |children s )?sex(?:ual)? (?:assault|abuse|exploitation|harassment|"
         r"violence|misconduct|predators?|predation|grooming|trafficking|offen[cs]es?|"
         r"offenders?)|sexting|child pornography|child sexual abuse material|csam|pornography "
         r"involving (?:minors|children)|"
         # (the word lists call these sexual too: issue 16, round four)
         r"inappropriate(?:ly)? touch(?:ing|ed)?|(?:online |child )?grooming|(?:being )?groomed"
         r"(?: by (?:an? |the )?[a-z]+)?|sexually (?:abused|assaulted|exploited|harassed))")
_BEFORE_HARM = (r"(?:prevent[a-z]*|stop[a-z]*|report[a-z]*|recogni[sz][a-z]*|spot[a-z]*|"
                r"identify[a-z]*|combat[a-z]*|fight[a-z]*|end|ending|awareness of|"
                r"definition of|defin[a-z]*|explain[a-z]* what|what constitutes|"
                r"understanding what|survivors of|dangers of|"
                r"signs of|risks of|(?:repercussions|consequences) of|"
                r"protect[a-z]* [a-z]+ from)(?: [a-z]+){0,3} ")
_AFTER_HARM = (r" (?:prevention|awareness|education|survivors?|support|hotlines?|helplines?|"
               r"reporting|campaigns?|workshops?|seminars?|programs?|programmes?|"
               r"polic(?:y|ies)|laws?|statistics|resources|is)")
_PORN = (r"(?:online |internet |easily accessible )?(?:pornography|pornographic "
         r"(?:content|material|media|websites?)|x rated (?:material|content)|(?:sexually )?"
         r"explicit (?:content|material|photos|images|pictures|messages)|adult content|"
         r"(?:intimate|compromising) (?:photos|images|pictures|content|material|videos))")
_MEDIA = r"(?:content|material|photos|images|pictures|messages)"
# what is done to such media in a protection prompt: blocked, filtered, shared, reported ...
_PORN_ACTS = (r"(?:block[a-z]*|filter[a-z]*|report[a-z]*|shar[a-z]*|send[a-z]*|sent|"
              r"receiv[a-z]*|circulat[a-z]*|distribut[a-z]*|spread[a-z]*|post[a-z]*|"
              r"forward[a-z]*|access[a-z]*|avoid[a-z]*|restrict[a-z]*|flag[a-z]*|"
              r"moderat[a-z]*|detect[a-z]*|recogni[sz][a-z]*|about|regarding|against)"
              r"(?: [a-z]+){0,2} ")
#: phrases that name a sexual subject and are set aside in an education / protection context
TOPIC_PATTERNS = [re.compile(r"(?<![a-z])(?:" + p + r")(?![a-z])") for p in (
    r"(?:sex|sexual|sexuality|sexual and reproductive) (?:education|ed|health|wellness)",
    r"safer? sex(?: practices)?", r"sexually transmitted (?:infections?|diseases?)",
    r"sexual " + _TOPIC, _BEFORE_HARM + _HARM, _HARM + _AFTER_HARM,
    r"sexuality",
    r"healthy sexual (?:habits|behaviou?rs?|relationships?|development|encounters?)",
    r"(?:effects?|impacts?|influences?) on (?:their )?sexual behaviou?rs?",
    # the harm of pornography, not pornography itself ("the effects of pornography on teens",
    # "pornography addiction", "the contrast between pornography and real relationships")
    r"(?:effects?|impacts?|dangers?|harms?|influences?|risks?|consequences?|exposure|"
    r"addiction|consumption|expectations set by|portrayals? in|representations? in|"
    r"depictions? in|depicted in|shown in|seen in) (?:of |to |on |from )?" + _PORN,
    _PORN + r"(?: s)? (?:consumption|addiction|exposure|literacy|representation|portrayal|"
    r"influence|impact|effects?|on)",
    r"(?:between|versus|vs|contrasted with|compared with|compared to) " + _PORN,
    _PORN + r" (?:and|versus|vs) (?:real|realistic|healthy)",
    # explicit media as what is blocked, shared or reported ("how to block explicit content",
    # "the consequences of sharing explicit photos")
    _PORN_ACTS + _PORN,
    # ... or what children are kept from ("protecting children from explicit content online")
    r"(?:protect[a-z]*|shield[a-z]*|keep[a-z]*|guard[a-z]*|safe|safer|away) (?:[a-z]+ ){0,3}"
    r"from " + _PORN,
)]


#: words that ask for the act itself to be shown: with any of them there is no exception
#: ("a minor reporting an assault, showing explicit details of it")
DEPICT = re.compile(r"(?<![a-z])(?:explicit(?! " + _MEDIA + r")|graphic|graphically|detailed|"
                    r"details|arous[a-z]*|"
                    r"sensual[a-z]*|physical sensations|uncensored|in the act|close up|"
                    r"closeup)(?![a-z])")


def has_context(text: str) -> bool:
    """Does the normalised text say it is about education, health or protection, without
    asking for the act to be shown?"""
    return CONTEXT.search(text) is not None and DEPICT.search(text) is None


def mask_topics(prompt: NormalisedPrompt) -> NormalisedPrompt:
    """The prompt with the topic phrases replaced by phrase breaks (text and alternates)."""
    return replace(prompt, text=_mask(prompt.text),
                   alternates=tuple(_mask(a) for a in prompt.alternates))


def _mask(text: str) -> str:
    for rx in TOPIC_PATTERNS:
        text = rx.sub(" , ", text)
    return re.sub(r"(?: ?,)+ ?", " , ", text).strip(" ,")
