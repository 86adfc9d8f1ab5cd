"""Rankings that read the query's image (docs/method.md, section 11): what compute_influence.py's --ranking ranks by.

The paper ranks candidates by their influence, the loss rise after unlearning the query. That rise mixes the
query's prompt (which every image of the prompt shares) with the query's image. The other rankings remove the
prompt's part with a reference that shares the prompt but not the image:

  control-corrected  z(influence) - z(influence of the noise-image control: same prompt, same noise, same
                     schedule, the image replaced by seeded Gaussian noise in latent space)
  model-contrast     z(influence) - mean over the query's peers of z(their influence); peers are the other queries
                     of its model (--contrast_with model), or the other samples of its prompt (--contrast_with prompt,
                     the model's other queries when it has none)
  combined           the places the paper's influence gives the exemplars and the pretraining candidates in the
                     ranking (AbC's per-model answer: Recall@K and AP unchanged), filled within each of the two
                     blocks in the order of the model-contrast term (the image's part)
  blended            combined's places, filled within each block in the order of z(influence) + z(image's part),
                     both standardised over the block: the query's whole ordering and its image's part in one order
                     (weight 1, chosen on the counterfactual truth's validation split: docs/counterfactual.md)

z(x) standardises over the candidates, (x - mean) / std: queries unlearned to different extents (a stopping rule
stops each at its own step) then weigh alike. Every part a ranking is made of is recorded in influence.pkl
(`parts`), and `compose` rebuilds the ranked score from them exactly.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from .errors import InputError

def standardize(values: np.ndarray) -> np.ndarray:
    """[n] -> [n] float64, (x - mean) / std over the candidates (std 1 when all are equal: the result is 0)."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    return (values - values.mean()) / (std if std > 0 else 1.0)


def peers_of(tasks: Sequence, contrast_with: str) -> Dict[str, list]:
    """{query's synth path: its peers (Tasks)} among `tasks` (a task file's queries): the other queries of its model,
    or with contrast_with="prompt" those of them with the same prompt when there are any. Raises InputError naming
    a model with a single query (a contrast needs another query of the model)."""
    peers = {}
    for t in tasks:
        same_model = [o for o in tasks if o.model_path == t.model_path and o.synth_image_path != t.synth_image_path]
        if not same_model:
            raise InputError(f"query {t.synth_image_path} is the only query of model {t.model_path} in the task file: "
                             "--ranking model-contrast and combined subtract the model's other queries; add samples "
                             "of the model (another seed of the prompt is enough), or use --ranking control-corrected")
        same_prompt = [o for o in same_model if o.prompt == t.prompt]
        peers[t.synth_image_path] = same_prompt if contrast_with == "prompt" and same_prompt else same_model
    return peers


def compose(parts: dict, ranking: str, n_exemplar: int) -> np.ndarray:
    """The score a ranking ranks by, [n candidates] float64 (exemplars first), from a query's recorded parts:
    "influence" [n] (the query's loss rise), "control" [n] (the noise-image control's; control-corrected) and
    "peers_z" [n] (mean of the peers' standardised influences; model-contrast and combined). Raises KeyError when
    a part the ranking needs is missing, ValueError for a ranking RANKINGS does not hold."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; one of {tuple(RANKINGS)}")
    return RANKINGS[ranking].score(parts, n_exemplar)


def image_part(parts: dict) -> np.ndarray:
    """z(influence) - mean over the peers of z(their influence): what the query's image adds to its prompt's."""
    return standardize(parts["influence"]) - parts["peers_z"]


@dataclass(frozen=True)
class Ranking:
    """One --ranking: what it needs besides the query's own loss rise (a noise-image control per distinct prompt of
    a model, or the model's other queries as peers; either makes a model's queries one unit of work), what that
    adds to a query's UNet forwards, and its score from the query's parts (utils.ranking.query_parts)."""

    needs_control: bool
    needs_peers: bool
    extra_cost: str
    score: Callable[[dict, int], np.ndarray]  # (parts, n_exemplar) -> [n candidates] float64


# Adding a ranking: one entry here (its score from the parts), its test; the flag's choices, the record and the
# routing (a model's queries together when it needs a control or peers) follow from the entry.
RANKINGS: Dict[str, Ranking] = {
    "influence": Ranking(False, False, "nothing",
                         lambda parts, n: np.asarray(parts["influence"], dtype=np.float64)),
    "control-corrected": Ranking(True, False, "one noise-image unlearning per distinct prompt of a model",
                                 lambda parts, n: standardize(parts["influence"]) - standardize(parts["control"])),
    "model-contrast": Ranking(False, True, "nothing (the peers are queries of the run)",
                              lambda parts, n: image_part(parts)),
    "combined": Ranking(False, True, "nothing (the peers are queries of the run)",
                        lambda parts, n: within_blocks(parts["influence"], image_part(parts), n)),
    "blended": Ranking(False, True, "nothing (the peers are queries of the run)",
                       lambda parts, n: within_blocks(parts["influence"], blended_order(parts, n), n)),
}


def within_blocks(influence: np.ndarray, order_by: np.ndarray, n_exemplar: int) -> np.ndarray:
    """[n] -> [n]: the influence values, dealt within each block (exemplars, then pretraining candidates) in the
    order of `order_by`: the block holding the highest value gets that block's highest influence, and so on. The
    positions the exemplars take in the ranking are the influence's (so Recall@K and AbC's AP are unchanged);
    which exemplar, and which pretraining image, takes each is decided by `order_by`."""
    influence = np.asarray(influence, dtype=np.float64)
    out = np.empty_like(influence)
    for block in (slice(0, n_exemplar), slice(n_exemplar, len(influence))):
        values = np.sort(influence[block])[::-1]
        order = np.argsort(-np.asarray(order_by[block], dtype=np.float64), kind="stable")
        dealt = np.empty_like(values)
        dealt[order] = values
        out[block] = dealt
    return out


def blended_order(parts: dict, n_exemplar: int, image_weight: float = 1.0) -> np.ndarray:
    """[n] float64: within each block (exemplars, then pretraining candidates), z(influence) + image_weight *
    z(image_part), each standardised over the block, so the two weigh alike whatever their spreads; a tie goes to
    the influence (1e-6 more of it). What `blended` deals the influence's places by."""
    influence, image = np.asarray(parts["influence"], dtype=np.float64), image_part(parts)
    out = np.empty_like(influence)
    for block in (slice(0, n_exemplar), slice(n_exemplar, len(influence))):
        out[block] = (1 + 1e-6) * standardize(influence[block]) + image_weight * standardize(image[block])
    return out


def query_parts(influence: np.ndarray, control: Optional[np.ndarray] = None,
                peers: Optional[Dict[str, np.ndarray]] = None) -> dict:
    """A query's parts as influence.pkl records them and `compose` reads them: "influence" [n] (its loss rise);
    with `control`, "control" [n] (the noise-image control's rise); with `peers` ({synth path: loss rise [n]}),
    "peers" (their synth paths) and "peers_z" [n] float64 (the mean of their standardised rises)."""
    parts = {"influence": influence}
    if control is not None:
        parts["control"] = control
    if peers is not None:
        parts.update(peers=list(peers), peers_z=np.mean([standardize(v) for v in peers.values()], axis=0))
    return parts
