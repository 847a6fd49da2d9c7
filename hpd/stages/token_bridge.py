"""Distilling across tokenizers from one cache: the teacher's cached distributions carried into a student's vocabulary.

The cache keeps the teacher's own token positions and ids. A student of another tokenizer trains on the same text in
its own tokens; both are laid on the text's bytes (never by decoding single tokens: a byte-level token may hold half
a character), and each student token j starts at some byte of some teacher token i, `d` bytes into it:

- d = 0 (both tokenizers cut the text there): the teacher's next-token distribution at i is the next-text
  distribution the student's token j answers. Each cached candidate w is carried to the student token its bytes
  begin with: the one with exactly its bytes if the student has it, else the longest student token its bytes start
  with (what a byte-level student writes first). The teacher's own token t_i goes to the student's actual token
  s_j: when s_j is shorter, s_j is t_i's first piece; when s_j runs on over t_i..t_l, it gets the chain's
  probability p(t_i) p(t_i+1 | ...) ... p(t_l | ...) (exact from the cached target log-probs) and the rest of
  p(t_i) goes to the tail.
- d > 0 (the student cuts inside a teacher token): the teacher's distribution at i conditioned on the d bytes
  already written: only candidates that begin with them count, each carried by the bytes after them as above,
  renormalised by their mass plus the whole cached tail (the tail's tokens are unknown; counting all of it as
  possible makes the conditioned tail an upper bound rather than a guess).
- Mass that lands on no student token (the teacher's special tokens the student lacks, rows of a padded head past
  the tokenizer's real vocabulary) joins the tail bucket: nothing is dropped or renormalised away.

What the losses then see is an ordinary top-k cache batch in the student's vocabulary (ids, log-probs, target
log-prob, tail), so every method that trains from a top-k cache trains through it. Special tokens match by name
(the same content), and the teacher's end of turn is the student's end of turn whatever each calls it. With
identical tokenizers every d is 0, every candidate keeps its id, and the batch is the cache's own.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from hpd.common.errors import HpdError
from hpd.storage.cache_batch import CacheBatch, ScoredSequence
from hpd.storage.gguf_export import byte_encoder, is_byte_level

SPECIAL = b"\xff"  # never in UTF-8 text: a special token's bytes are this and its name, so only its namesake matches
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: each character a byte-level piece is written in, to its byte."""
    return {c: b for b, c in byte_encoder().items()}


def vocabulary_bytes(tokenizer) -> list[bytes]:
    """Each id's bytes: byte-level pieces through GPT-2's byte table, SentencePiece pieces with their '▁' as a space
    and byte-fallback pieces (<0xE2>) as that byte, added tokens as their text (special ones marked, see SPECIAL)."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = tokenizer.added_tokens_decoder
    decoder = _byte_decoder() if is_byte_level(tokenizer) else None
    out = []
    for i, piece in enumerate(pieces):
        if piece is not None and (m := _BYTE_PIECE.fullmatch(piece)):  # byte fallback, however it was registered
            out.append(bytes([int(m[1], 16)]))
        elif i in added:
            a = added[i]
            out.append(SPECIAL + a.content.encode() if a.special else a.content.encode())
        elif piece is None:
            out.append(b"")
        elif decoder is not None and all(c in decoder for c in piece):
            out.append(bytes(decoder[c] for c in piece))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


@dataclass
class Aligned:
    """One sequence in the student's tokens, with where each response token starts in the teacher's: student
    response token j starts `offset[j]` bytes into teacher response token `first[j]` and ends in teacher token
    `last[j]`; -1 where the student's token lies past the teacher's text (it is then not trained on)."""

    input_ids: list[int]
    prompt_len: int
    first: np.ndarray
    offset: np.ndarray
    last: np.ndarray

    @property
    def covered(self) -> int:
        return int((self.first >= 0).sum())


class Bridge:
    """Teacher tokens to student tokens (`align`), and the teacher's cached distributions into the student's
    vocabulary (`project`). Built once per student stage from the two tokenizers."""

    def __init__(self, teacher_tok, student_tok):
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        self.t_bytes = vocabulary_bytes(teacher_tok)
        self.s_bytes = vocabulary_bytes(student_tok)
        self.t_eos, self.s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
        if self.t_eos is not None and self.s_eos is not None:  # one end of turn, whatever each calls it
            self.t_bytes[self.t_eos] = self.s_bytes[self.s_eos]
        self.by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(self.s_bytes):
            if b:
                self.by_bytes.setdefault(b, i)
        self.longest = max(map(len, self.by_bytes), default=0)
        self._phi: dict[bytes, int] = {}
        self.identical = teacher_tok.get_vocab() == student_tok.get_vocab() and self.t_bytes == self.s_bytes

    # -- the text in the student's tokens ------------------------------------------------------------------------
    def teacher_bytes(self, ids) -> bytes:
        return b"".join(self.t_bytes[i] if 0 <= i < len(self.t_bytes) else b"" for i in ids)

    def student_response(self, teacher_response: list[int]) -> list[int]:
        """The student's tokens of the teacher's response: the text between special tokens tokenized as text, a
        byte that is not UTF-8 (a character cut off, a stray byte a model wrote) as the student's token of that
        byte where it has one, special tokens by name, the end of turn as the student's."""
        out, text = [], b""

        def flush(text: bytes):
            while text:
                try:
                    out.extend(self.student_tok(text.decode("utf-8"), add_special_tokens=False)["input_ids"])
                    return
                except UnicodeDecodeError as e:
                    if e.start:
                        out.extend(self.student_tok(text[: e.start].decode(), add_special_tokens=False)["input_ids"])
                    out.extend(
                        self.by_bytes[x] for x in (text[i : i + 1] for i in range(e.start, e.end)) if x in self.by_bytes
                    )
                    text = text[e.end :]

        for i in teacher_response:
            b = self.t_bytes[i] if 0 <= i < len(self.t_bytes) else b""
            if b.startswith(SPECIAL):
                flush(text)
                text = b""
                if b in self.by_bytes:
                    out.append(self.by_bytes[b])
            else:
                text += b
        flush(text)
        return out

    def align(self, prompt_ids: list[int], teacher_response: list[int], response: list[int] | None = None) -> Aligned:
        """The student's sequence for a teacher's (`prompt_ids`: the student's own rendering of the prompt) and,
        per student response token, the teacher token it starts in and how far into it. The two byte strings are
        matched (difflib): they differ where the student's tokenizer adds a space before the first word or leaves
        out a byte it cannot write. A student token is placed where its bytes are the teacher's, bytes it adds
        before them aside; one that is not the teacher's text has no teacher position. `response`: the student's
        tokens when they are already fixed (another teacher's of the same text, in an ensemble)."""
        if response is None:
            response = list(teacher_response) if self.identical else self.student_response(teacher_response)
        t_len = np.array([len(self.t_bytes[i]) if 0 <= i < len(self.t_bytes) else 0 for i in teacher_response])
        t_end = np.cumsum(t_len).astype(np.int64)  # the byte after each teacher token
        t_start = t_end - t_len
        teacher_text, student_text = self.teacher_bytes(teacher_response), b"".join(self.s_bytes[i] for i in response)
        at = np.full(len(student_text) + 1, -1, dtype=np.int64)  # each student byte's place in the teacher's text
        if teacher_text == student_text:
            at[:-1] = np.arange(len(student_text))
        else:
            matcher = difflib.SequenceMatcher(None, teacher_text, student_text, autojunk=False)
            for block in matcher.get_matching_blocks():
                at[block.b : block.b + block.size] = np.arange(block.a, block.a + block.size)
        s_len = [len(self.s_bytes[i]) for i in response]
        s_off = np.concatenate([[0], np.cumsum(s_len)]).astype(np.int64)
        first = np.full(len(response), -1, dtype=np.int64)
        offset, last = np.zeros_like(first), np.full_like(first, -1)
        for j in range(len(response)):
            where = at[s_off[j] : s_off[j + 1]]
            added = int(np.argmax(where >= 0)) if (where >= 0).any() else len(where)
            placed = where[added:]
            if not len(placed) or (placed < 0).any() or (len(placed) > 1 and (np.diff(placed) != 1).any()):
                continue
            i = int(np.searchsorted(t_end, placed[0], side="right"))
            first[j], offset[j] = i, placed[0] - t_start[i]
            last[j] = int(np.searchsorted(t_end, placed[-1], side="right"))
        return Aligned(
            input_ids=list(prompt_ids) + response, prompt_len=len(prompt_ids), first=first, offset=offset, last=last
        )

    # -- the teacher's distribution in the student's vocabulary ----------------------------------------------------
    def phi(self, b: bytes) -> int:
        """The student token text `b` begins with: the one with exactly these bytes, else the longest prefix
        (-1: none, e.g. a special token the student lacks)."""
        hit = self._phi.get(b)
        if hit is None:
            hit = -1
            if not b.startswith(SPECIAL):
                for n in range(min(len(b), self.longest), 0, -1):
                    if b[:n] in self.by_bytes:
                        hit = self.by_bytes[b[:n]]
                        break
            elif b in self.by_bytes:
                hit = self.by_bytes[b]
            self._phi[b] = hit
        return hit

    def project(self, row: ScoredSequence, at: int, t_tokens, i: int, d: int, last: int, s_id: int, k: int):
        """The student's target at one position: (ids [k], log-probs [k], target log-prob, tail log-mass). `row`:
        the teacher's cache row, `at`: its entry for teacher response token i; `t_tokens`: the teacher's response
        tokens; `s_id`: the student's token there, starting d bytes into t_i and ending in t_last."""
        t_i = t_tokens[i]
        prefix = self.t_bytes[t_i][:d]
        mass: dict[int, float] = {}
        to_tail = consistent = 0.0
        in_top = False
        for w, lp in zip(row.topk_ids[at].tolist(), row.topk_logprobs[at].tolist()):
            if lp == -math.inf:
                continue
            p = math.exp(lp)
            if w == t_i:
                in_top = True
                continue
            wb = self.t_bytes[w] if 0 <= w < len(self.t_bytes) else b""
            if not wb.startswith(prefix):
                continue  # inconsistent with the bytes already written
            consistent += p
            rest = wb[d:]
            if self.identical:  # one vocabulary: each id is itself (a padded head's rows past it are tail)
                v = w if w < len(self.s_bytes) else -1
            else:
                v = self.phi(rest) if rest else -1
            if v < 0:
                to_tail += p
            else:
                mass[v] = mass.get(v, 0.0) + p
        # the teacher's own token, exact whether or not it is in the top-k: to the student's token (by the chain
        # of teacher tokens it spans), the rest of its mass to the tail
        p_t = math.exp(float(row.target_logprob[at]))
        chain = math.exp(float(sum(row.target_logprob[at + 1 : at + 1 + (last - i)]))) if last > i else 1.0
        mass[s_id] = mass.get(s_id, 0.0) + p_t * chain
        to_tail += p_t * (1.0 - chain)
        consistent += p_t
        tail = max(math.exp(float(row.tail_logmass[at])) - (0.0 if in_top else p_t), 0.0)
        z = consistent + tail if d else 1.0
        ids = sorted(mass, key=mass.get, reverse=True)[:k]
        dropped = sum(mass.values()) - sum(mass[v] for v in ids)
        out_ids = np.full(k, ids[0], dtype=np.int64)
        out_lp = np.full(k, -math.inf, dtype=np.float32)
        out_ids[: len(ids)] = ids
        out_lp[: len(ids)] = [math.log(mass[v] / z) if mass[v] > 0 else -math.inf for v in ids]
        tail_total = (tail + to_tail + dropped) / z
        target = math.log(mass[s_id] / z) if mass[s_id] > 0 else -math.inf
        return out_ids, out_lp, target, math.log(tail_total) if tail_total > 0 else -math.inf

    def batch(
        self, rows: list[ScoredSequence], teacher_seqs, teacher_plens, aligned: list[Aligned], length: int, k: int
    ):
        """A CacheBatch on the student's [B, length] grid: entry t describes student token t+1, filled at every
        response token that has a teacher position; `mask` False elsewhere."""
        B = len(rows)
        out = CacheBatch(
            topk_ids=torch.zeros(B, length, k, dtype=torch.long),
            topk_logprobs=torch.full((B, length, k), -math.inf),
            target_logprob=torch.zeros(B, length),
            tail_logmass=torch.full((B, length), -math.inf),
            mask=torch.zeros(B, length, dtype=torch.bool),
        )
        for b, (row, seq, plen, a) in enumerate(zip(rows, teacher_seqs, teacher_plens, aligned)):
            t_tokens = list(seq[plen:])
            for j in np.nonzero(a.first >= 0)[0]:
                i, at = int(a.first[j]), plen + int(a.first[j]) - 1 - row.start
                s_pos = a.prompt_len + int(j)
                ids, lp, target, tail = self.project(
                    row, at, t_tokens, i, int(a.offset[j]), int(a.last[j]), a.input_ids[s_pos], k
                )
                g = s_pos - 1
                out.topk_ids[b, g] = torch.from_numpy(ids)
                out.topk_logprobs[b, g] = torch.from_numpy(lp)
                out.target_logprob[b, g] = target
                out.tail_logmass[b, g] = tail
                out.mask[b, g] = True
        return out


def mixed_batch(parts: list[CacheBatch], weights, vocab_size: int, k: int, weighting: str = "fixed") -> CacheBatch:
    """Several teachers' batches on one student grid (each from its own cache through its own bridge) as their
    mixture (hpd/storage/merge.py), at every position where at least one teacher has a target: there each teacher
    that has one counts with its weight, renormalised over them."""
    from hpd.storage.merge import mix_positions

    has = torch.stack([p.mask for p in parts])  # [T, B, L]
    mask = has.any(0)
    at = mask.nonzero(as_tuple=True)
    B, L = mask.shape
    out = CacheBatch(
        topk_ids=torch.zeros(B, L, k, dtype=torch.long),
        topk_logprobs=torch.full((B, L, k), -math.inf),
        target_logprob=torch.zeros(B, L),
        tail_logmass=torch.full((B, L), -math.inf),
        mask=mask,
    )
    if not len(at[0]):
        return out
    w = torch.as_tensor(np.asarray(weights, np.float64))[:, None] * has[(slice(None), *at)].double()
    teachers = [(p.topk_ids[at], p.topk_logprobs[at], p.tail_logmass[at], p.target_logprob[at]) for p in parts]
    ids, lp, tail, target = mix_positions(teachers, w.numpy(), vocab_size, k, weighting)
    out.topk_ids[at], out.topk_logprobs[at], out.tail_logmass[at], out.target_logprob[at] = ids, lp, tail, target
    return out


def student_dataset(bridge: Bridge, dataset, store, prompts: list[str], others=()):
    """(the training rows in the student's tokens, the share of their response tokens that get a teacher target).
    Each row keeps the teacher's tokens it was scored on (`teacher_ids`, `teacher_prompt_len`: the cache row is
    checked against them) and its alignment (`first`, `offset`, `last`); the prompt is the student's own chat
    template's rendering of the prompt the teacher answered. `others`: an ensemble's other teachers, each (its
    bridge, its sequences of the same texts in its tokens), aligned to the same student tokens (columns suffixed
    _1, _2, ...); a token counts as covered when any teacher has a target there."""
    from datasets import Dataset

    from .batching import encode_pair

    prompt_of = {}
    for shard in range(-(-len(store) // store.shard_size)):
        prompt_of.update(zip(store.shard_rows(shard)[0].tolist(), store.prompt_index(shard).tolist()))
    cols = dataset.to_dict()
    rendered: dict[int, list[int]] = {}
    aligned: dict[int, Aligned] = {}
    out: dict[str, list] = {k: [] for k in ("teacher_ids", "teacher_prompt_len", "first", "offset", "last")}
    for seq_id, ids, plen in zip(cols["seq_id"], cols["input_ids"], cols["prompt_len"]):
        if seq_id not in aligned:
            p = prompt_of[seq_id]
            if p not in rendered:
                rendered[p] = encode_pair(bridge.student_tok, prompts[p], None)[0]
            aligned[seq_id] = bridge.align(rendered[p], ids[plen:])
        a = aligned[seq_id]
        out["teacher_ids"].append(ids)
        out["teacher_prompt_len"].append(plen)
        out["first"].append(a.first.tolist())
        out["offset"].append(a.offset.tolist())
        out["last"].append(a.last.tolist())
    any_teacher = {s: a.first >= 0 for s, a in aligned.items()}
    for t, (other, other_store) in enumerate(others, 1):
        seq_ids, plens, seqs = other_store.range(0, len(other_store))
        theirs = {int(i): (x.tolist(), int(n)) for i, n, x in zip(seq_ids, plens, seqs)}
        mine: dict[int, Aligned] = {}
        for name in ("teacher_ids", "teacher_prompt_len", "first", "offset", "last"):
            out[f"{name}_{t}"] = []
        for seq_id in cols["seq_id"]:
            if seq_id not in theirs:
                raise HpdError(
                    f'teachers.mode="ensemble": sequence {seq_id} has no counterpart among another teacher\'s '
                    f"sequences; an ensemble's teachers score the same texts (the same [data] and [generate])"
                )
            ids, plen = theirs[seq_id]
            if seq_id not in mine:
                a = aligned[seq_id]
                mine[seq_id] = other.align(a.input_ids[: a.prompt_len], ids[plen:], a.input_ids[a.prompt_len :])
                any_teacher[seq_id] = any_teacher[seq_id] | (mine[seq_id].first >= 0)
            b = mine[seq_id]
            out[f"teacher_ids_{t}"].append(ids)
            out[f"teacher_prompt_len_{t}"].append(plen)
            out[f"first_{t}"].append(b.first.tolist())
            out[f"offset_{t}"].append(b.offset.tolist())
            out[f"last_{t}"].append(b.last.tolist())
    cols["input_ids"] = [aligned[s].input_ids for s in cols["seq_id"]]
    cols["prompt_len"] = [aligned[s].prompt_len for s in cols["seq_id"]]
    covered = sum(int(c.sum()) for c in any_teacher.values()) / max(sum(len(c) for c in any_teacher.values()), 1)
    return Dataset.from_dict({**cols, **out}), covered
