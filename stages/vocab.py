"""Stage `vocab`: CLIP_tokenized_count.txt, GloVe_tokenized_count.txt and glove.pkl from the dataset's
sentences (the splits in `vocab.splits`, cleaned with `dataset.cleaning`), plus vocab_report.json with
the annotation counts and what each cleaning rule changed."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.atomic import write_json, write_text
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log
from pipeline.core.provenance import make_record, write_record
from pipeline.media.framestore import decoded_durations, durations_path
from pipeline.text import vocab
from pipeline.text.annotations import AnnotationError, load_dataset_split
from stages.common import duration_files

OUTPUTS = ("CLIP_tokenized_count.txt", "GloVe_tokenized_count.txt", "glove.pkl", "vocab_report.json")


def run(params: Params, source: str, **_: object) -> None:
    d, v = params.dataset, params.vocab
    unknown = [s for s in v.splits if s not in d.splits]
    if unknown:
        raise ParamsError(f"{source}: key 'vocab.splits': split(s) {unknown} not in dataset.splits {sorted(d.splits)}")
    files = {f"dataset.splits.{s}": d.splits[s] for s in v.splits}
    files |= {key: str(path) for key, path in duration_files(params, source).items()}
    files["vocab.glove_file"] = v.glove_file
    require_files(source, files)
    if v.glove_file and d.name != "synthetic" and Path(params.synth.out_dir).resolve() in Path(v.glove_file).resolve().parents:
        # the synthetic default's file leaking into a real dataset's run: random vectors named like GloVe
        raise ParamsError(f"{source}: key 'vocab.glove_file': {v.glove_file} is the synthetic dataset's random "
                          f"stand-in, not GloVe, and dataset.name is '{d.name}': set a GloVe text file, or null "
                          "(no glove.pkl)")
    durations = decoded_durations(d, params.decode.out_dir)

    sentences: list[str] = []
    reports = {}
    try:
        for split in v.splits:  # in the order given: glove.pkl ids follow first appearance
            ann = load_dataset_split(d, split, durations)
            sentences += [q.sentence for q in ann]
            reports[split] = ann.report
            c = {k: n for k, n in ann.report["cleaning"].items() if k != "policy"}
            log(f"vocab: {split}: {ann.report['records_read']} read, {len(ann)} kept "
                f"({ann.report['cleaning']['policy']}: {c}), {ann.report['malformed_skipped']} malformed skipped")
    except (AnnotationError, ValueError) as e:
        raise ParamsError(str(e)) from None

    out = Path(v.out_dir)
    clip_counts = vocab.clip_token_counts(sentences, v.clip_max_pieces)
    glove_counts = vocab.glove_word_counts(sentences)
    write_text(out / "CLIP_tokenized_count.txt", vocab.format_clip_counts(clip_counts))
    write_text(out / "GloVe_tokenized_count.txt", vocab.format_glove_counts(glove_counts))
    summary = {
        "splits": list(v.splits),
        "sentences": len(sentences),
        "clip_tokens": len(clip_counts),
        "glove_count_words": len(glove_counts),
        "pos_tagger": vocab.pos_tagger_name(),
        "annotations": reports,
    }
    if v.glove_file:
        candidates = {w for s in sentences for w in vocab.word_tokenize(s.lower())}
        glove = vocab.read_glove_text(v.glove_file, v.glove_dim, words=candidates)
        pkl = vocab.build_glove_pkl(sentences, glove)
        vocab.write_glove_pkl(out / "glove.pkl", pkl)
        summary |= {"glove_pkl_words": len(pkl["w2id"]) - 1,
                    "glove_missing_words": sorted(candidates - set(glove))[:50],
                    "glove_missing_count": len(candidates - set(glove))}
    else:
        (out / "glove.pkl").unlink(missing_ok=True)  # never leave a stale one behind
        summary["glove_pkl_words"] = None
    write_json(out / "vocab_report.json", summary)
    inputs = {f"split_{s}": d.splits[s] for s in v.splits}
    if durations is not None:
        inputs["durations"] = str(durations_path(params.decode.out_dir))
    if v.glove_file:
        inputs["glove"] = v.glove_file
    write_record(out, make_record("vocab", subset(params, "dataset", "vocab") | (
        {"decode.out_dir": params.decode.out_dir} if durations is not None else {}), inputs=inputs,
                                  extra={"pos_tagger": summary["pos_tagger"]}, code=stage_code("vocab")))
    log(f"vocab: {len(sentences)} sentences from {list(v.splits)} -> {len(clip_counts)} CLIP tokens, "
        f"{len(glove_counts)} count words, glove.pkl {summary['glove_pkl_words']} words -> {out}")
