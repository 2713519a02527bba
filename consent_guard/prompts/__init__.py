"""Prompt checks: stop an explicit request before the sampler spends a second on it.

Data flows one way:
  normalise.py  text -> NormalisedPrompt (NFKC, casefold, marks, homoglyphs, leetspeak,
                separators, stretched letters, ComfyUI/A1111 prompt syntax; LoRA and
                embedding names are kept as words)
  lexicon.py    NormalisedPrompt -> [Hit(category, term, lang, matched)] from the curated
                per-language lists in lexicon/ (categories: explicit, suggestive, minor, undress)
  classifier.py text -> score 0..1 (multilingual sentence embeddings + a small linear model),
                a threshold per script; loads in the background at start (start_loading)
  check.py      all of it -> Verdict (sexual_explicit, sexual_suggestive, undress_request,
                minor_sexual, protected_identity); negative prompts never trigger anything
"""
