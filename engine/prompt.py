"""Turning a question into prompt token ids, as the checkpoint's format says.

For ``N`` thoughts fed as hidden states the prompt is
``tokenizer(question + question_suffix)`` (with the tokenizer's default special tokens,
e.g. BOS for Llama) followed by ``<bot>``; the engine then feeds the N thoughts and
``<eot>``. Policy ``none`` adds no markers. Two cases end the prompt in language mode
already, so the prefill's logits give the first answer token:

- zero thoughts: ``... <bot> <eot>``;
- ``pause_as_thought`` models: ``... <bot> <latent>*N <eot>`` (their thoughts are the
  latent token's embedding, fixed inputs that need no feedback).

A checkpoint may put tokens between the question and ``<bot>`` (``latent_prefix_tokens``)
and after ``<eot>`` (``latent_suffix_tokens``): CODI's layout is ``question EOS <bot>``,
thoughts, ``<eot> EOS``. A tokenizer with a chat template renders conversations
(``build_chat``) before the markers.

A checkpoint with ``text_format: compact`` was trained on ProsQA facts written as
``s t |``; a question in the reference sentences ("Every A is a B. ... Is X a A or B?")
or already compact is parsed into its graph (``engine.data.question``) and rendered
compactly. Such a model reads nothing else: a question without facts or without
"Is X a A or B?", a word it has no single token for, a non-ASCII name or a control
character raises ``ValueError`` that says what the model reads (the server's 422). Its
answer (``Tom yumpus``) is given back in the question's wording (``Tom is a yumpus.``).
A control character (a NUL byte, say) is refused for every model.
"""

from __future__ import annotations

import unicodedata
from typing import NamedTuple

from engine.checkpoint import CoconutConfig, MarkerIds
from engine.params import ResolvedLatent


class Prompt(NamedTuple):
    ids: list[int]
    in_language: bool          # the prompt already ends in language mode
    graph: object | None       # the question's QuestionGraph (compact models), else None
    node_ids: list[int] | None = None   # one token id per graph.nodes entry (what a trace watches)
    # a symbols model: token id -> the question's own word (with its leading space), to write
    # the output in the question's names (engine.data.symbols)
    renamed_tokens: dict[int, str] | None = None


class PromptFormat:
    def __init__(self, tokenizer, config: CoconutConfig, markers: MarkerIds):
        self.tokenizer = tokenizer
        self.config = config
        self.markers = markers
        self._word_ids: dict[str, int | None] = {}   # node word -> its one token id (or None)

    def _node_ids(self, graph) -> list[int | None]:
        """``node_token_ids`` of the graph, remembered per word (a symbols model reads the
        same few dozen words in every question)."""
        from engine.data.question import word_token_ids

        missing = [w for w in dict.fromkeys(graph.nodes) if w not in self._word_ids]
        if missing:
            if len(self._word_ids) > 100_000:   # open vocabularies: keep the memory bounded
                self._word_ids.clear()
            self._word_ids.update(zip(missing, word_token_ids(missing, self.tokenizer)))
        return [self._word_ids[w] for w in graph.nodes]

    def question_ids(self, question: str) -> list[int]:
        return self._encode(question)[0]

    def _encode(self, question: str):
        """(question ids, graph, node ids, renamed tokens); graph and node ids only for compact
        models, renamed tokens only for symbols models."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        graph = node_ids = renamed = None
        if self.config.text_format == "compact":
            graph, node_ids = self._read(question)      # refuses control characters too
            question = graph.compact()
            if self.config.symbols:
                question, node_ids, renamed = self._rename(graph)
        else:
            _refuse_control_characters(question)
        ids = list(self.tokenizer(question + self.config.question_suffix)["input_ids"])
        return ids, graph, node_ids, renamed

    def _rename(self, graph):
        """The question in symbols (a fixed assignment per question), each node's symbol token
        (``graph.nodes`` order) and the symbol tokens mapped back to the question's words."""
        from engine.data.question import QuestionGraph
        from engine.data.symbols import SymbolMap

        compact = graph.compact()
        names = SymbolMap.for_text(compact, self.config.symbols, seed=compact)
        to = names.forward
        # the graph of the renamed text (what parse_question(names.rename(compact)) reads), built
        # without parsing it again
        renamed = QuestionGraph(name=to[graph.name], options=(to[graph.options[0]], to[graph.options[1]]),
                                edges=tuple((to[a], to[b]) for a, b in graph.edges))
        node_ids = self._node_ids(renamed)
        return renamed.compact(), node_ids, {i: " " + n for i, n in zip(node_ids, graph.nodes)}

    def read_graph(self, question: str):
        """The question's graph, if a compact model can read it (``ValueError`` saying why not)."""
        return self._read(question)[0]

    def _read(self, question: str):
        from engine.data.question import parse_question

        try:
            graph = parse_question(question)
        except ValueError as e:
            raise ValueError(f"this model reads ProsQA questions only: {e}") from None
        if self.config.symbols:   # any word will do: it is renamed to a symbol
            from engine.data.symbols import names_in

            named = len(names_in(graph.compact()))
            if named > self.config.symbols:
                raise ValueError(f"the question names {named} people and concepts; this model reads ProsQA "
                                 f"questions that name at most {self.config.symbols}")
            return graph, None
        node_ids = self._node_ids(graph)
        unknown = [w for w, i in zip(graph.nodes, node_ids) if i is None]
        if unknown:
            raise ValueError(f"this model has no token for {', '.join(repr(w) for w in unknown)}: it reads "
                             f"the person names and '-pus' concept words of ProsQA (e.g. 'Tom', 'wumpus'), "
                             f"one token each")
        return graph, node_ids

    def build(self, question: str, latent: ResolvedLatent) -> Prompt:
        """The prompt ids, whether they already end in language mode, and the graph."""
        ids, graph, node_ids, renamed = self._encode(question)
        return self._with_markers(ids, latent, graph, node_ids, renamed)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def build_chat(self, messages: list[dict[str, str]], latent: ResolvedLatent) -> Prompt:
        """A conversation rendered by the tokenizer's chat template (with the generation
        prompt; its special tokens are the template's, none added), then the markers."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        for message in messages:
            _refuse_control_characters(str(message.get("content", "")))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._with_markers(ids, latent, None, None, None)

    def _with_markers(self, ids: list[int], latent: ResolvedLatent, graph, node_ids, renamed) -> Prompt:
        """``ids [prefix] <bot>`` for thoughts fed back (the engine feeds them, then ``<eot>
        [suffix]``); the whole latent span when the prompt ends in language already."""
        m = self.markers
        if latent.mode == "none":
            return Prompt(ids, True, graph, node_ids, renamed)
        opening = ids + list(m.prefix) + [m.bot]
        closing = [m.eot] + list(m.suffix)
        if latent.feed == "pause":
            return Prompt(opening + [m.latent] * latent.thoughts + closing, True, graph, node_ids, renamed)
        if latent.mode == "fixed" and latent.thoughts == 0:
            return Prompt(opening + closing, True, graph, node_ids, renamed)
        return Prompt(opening, False, graph, node_ids, renamed)

    def answer(self, text: str, graph=None) -> str:
        """The answer inside generated text: what follows the last answer prefix, stripped;
        a compact model's ``Tom yumpus`` in the question's wording, ``Tom is a yumpus.``
        (``an`` where the question's ``graph`` wrote that word after "an")."""
        marker = self.config.answer_prefix.strip()
        answer = text.strip()
        if marker:
            at = text.rfind(marker)
            if at >= 0:
                answer = text[at + len(marker):].strip()
        if self.config.text_format == "compact":
            words = answer.split()
            if len(words) == 2 and all(w.isascii() and w.isalpha() for w in words):
                article = "an" if graph is not None and words[1] in graph.with_an else "a"
                return f"{words[0]} is {article} {words[1]}."
        return answer


def _refuse_control_characters(question: str) -> None:
    for i, ch in enumerate(question):
        if ch not in "\n\r\t" and unicodedata.category(ch) == "Cc":
            raise ValueError(f"the question contains a control character (U+{ord(ch):04X} at position {i}); "
                             f"remove it")
