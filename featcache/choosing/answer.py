"""The answer of ``featcache choose`` as a small object: what it printed, its tables, and its HTML in a notebook.

Inside choosing (run -> **answer**); the report's choice section reads the same folder. :meth:`Choice.load`
checks what it reads (a shared folder is data, not trusted): a malformed ``answer.json`` is one line.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from featcache.errors import FeatcacheError

MAX_ANSWER_BYTES = 4 << 20


def _number(value, name: str):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FeatcacheError(f"answer.json: {name} is not a number")
    return value


@dataclass(frozen=True)
class Choice:
    """``featcache.choose()``'s return value: ``recommended``, ``fast`` and ``tied`` (dicts: candidate, backbones,
    taps, head, params, cv_accuracy, p_best, images_per_s ...), ``table`` (the finalists, a DataFrame), ``trust``
    (each score and baseline against the probes), ``funnel`` (each round) and ``folder``."""

    folder: Path
    answer: dict
    table: object
    trust: object
    funnel: object
    served: bool = False  # read back from an identical earlier choice, nothing probed again

    @classmethod
    def load(cls, folder: Path, served: bool = False) -> Choice:
        from featcache.data.safe import read_regular, regular_csv

        folder = Path(folder)
        try:
            answer = json.loads(read_regular(folder / "answer.json", "answer", MAX_ANSWER_BYTES))
        except FileNotFoundError:
            raise FeatcacheError(f"{folder} holds no answer.json: not a featcache choose folder") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise FeatcacheError(f"{folder / 'answer.json'} is not the JSON featcache choose writes ({exc})") from None
        if not isinstance(answer, dict) or answer.get("kind") != "choice" or not all(
                isinstance(answer.get(k), dict) for k in ("recommended", "fast")):
            raise FeatcacheError(f"{folder / 'answer.json'} is not an answer featcache choose wrote")
        for part in ("recommended", "fast"):
            for key in ("cv_accuracy", "p_best"):
                _number(answer[part].get(key), f"{part}.{key}")
        def csv(name: str):
            return regular_csv(folder / name, name, MAX_ANSWER_BYTES)

        table = csv("candidates.csv")
        return cls(folder, answer, table[table["round"] == "decide"].reset_index(drop=True), csv("trust.csv"),
                   csv("funnel.csv"), served)

    @property
    def recommended(self) -> dict:
        return self.answer["recommended"]

    @property
    def fast(self) -> dict:
        return self.answer["fast"]

    @property
    def tied(self) -> list[dict]:
        return self.answer.get("tied", [])

    def sentence(self) -> str:
        """The one sentence a supervisor reads."""
        a, r = self.answer, self.recommended
        low, high = r["interval"]
        what = f"{r['candidate']} with {_head(r)}"
        if not a["beats_chance"]:
            return (f"No candidate is shown to beat chance on {a['dataset']}: the best, {what}, is right on "
                    f"{_pct(r['cv_accuracy'])} of the training images out of fold against {_pct(a['chance'])} for "
                    f"always answering the commonest class (one-sided binomial test, corrected for "
                    f"{len(a['finalists'])} finalists: p = {a['chance_p']:.2g}). Nothing here is a recommendation.")
        tied = len(self.tied) - 1
        return (f"Use {what}: {_pct(r['cv_accuracy'])} accuracy over {a['folds']} folds of {a['train_images']} "
                f"training images (95% interval {_pct(low)} to {_pct(high)}), the best in {_pct(r['p_best'], 0)} of "
                f"bootstrap resamples" + (f", tied with {tied} other candidate(s)" if tied else ", alone at the top")
                + f"; {_pct(r['test_accuracy'])} on the {a['test_images']} test images, scored once at the end.")

    def lines(self) -> list[str]:
        """What the command prints: at most 12 lines."""
        a, r, f = self.answer, self.recommended, self.fast
        similar = f" (its taps' linear CKA {r['cka']:.2f})" if isinstance(r.get("cka"), (int, float)) else ""
        out = [("recommended: " if a["beats_chance"] else "no recommendation (nothing beats chance): best ")
               + f"{r['candidate']}, {_head(r)}{similar}",
               f"  {a['folds']}-fold accuracy {_pct(r['cv_accuracy'])} [{_pct(r['interval'][0])}, "
               f"{_pct(r['interval'][1])}], P(best) {r['p_best']:.2f}, test {_pct(r['test_accuracy'])} (scored once)"]
        others = [t["candidate"] + f" {t['head']}" for t in self.tied[1:]]
        out.append(f"  tied with it (McNemar p >= 0.05): {', '.join(others[:3])}"
                   + (f" and {len(others) - 3} more" if len(others) > 3 else "") if others
                   else "  tied with it: none (every other finalist is separated, McNemar p < 0.05)")
        if f["candidate"] != r["candidate"] or f["head"] != r["head"]:
            out.append(f"fast choice: {f['candidate']}, {_head(f)}: {_rate(f)} against {_rate(r)}, gives up "
                       f"{100 * f['gives_up']:.1f} points")
        else:
            out.append(f"fast choice: the same ({_rate(r)}): nothing faster is tied with it")
        rounds = self.funnel.to_dict("records")
        out.append("funnel: " + " -> ".join(f"{x['candidates']} {x['round']}" for x in rounds)
                   + f" -> {len(self.tied)} tied; {a['fits']} probe fits in {a['probe_seconds']:.0f} s"
                   + (" (the budget was too small for full rounds: each took its fewest)" if a["cramped"] else ""))
        scores = self.trust[self.trust["kind"] == "score"]
        trusted = scores[scores["informative"] == True]  # noqa: E712 (a column of True/False/NaN)
        doubtful = scores[scores["informative"] != True]  # noqa: E712
        if len(trusted):
            out.append("informative here: " + ", ".join(f"{x.name} (tau {x.kendall_tau:+.2f}, regret "
                                                         f"{100 * x.regret:.1f})" for x in trusted.itertuples()))
        if len(doubtful):
            out.append("not informative on this data: " + "; ".join(f"{x.name} ({x.why})"
                                                                     for x in doubtful.itertuples()))
        if a.get("failed_models"):
            out.append(f"{len(a['failed_models'])} model(s) failed and were left out: "
                       f"{', '.join(a['failed_models'][:4])} (reasons: {a['ranking']}/table.csv)")
        out.append(f"served from {self.folder}: the same request on the same screen, nothing probed again"
                   if self.served else f"written to {self.folder} (answer.json, candidates.csv, trust.csv)")
        return out[:12]

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        columns = ["candidate", "head", "chosen", "accuracy", "p_best", "p_value", "tied", "images_per_s"]
        return (f"<p><b>{html.escape(self.sentence())}</b></p>"
                + self.table[[c for c in columns if c in self.table]].to_html(index=False, float_format="%.3f"))


def _head(entry: dict) -> str:
    return entry["head"] + " " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in entry["params"].items())


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def _rate(entry: dict) -> str:
    rate = entry.get("images_per_s")
    return "? images/s" if rate is None or rate != rate else f"{rate:.0f} images/s"
