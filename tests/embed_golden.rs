//! all-MiniLM-L6-v2 embeddings against sentence-transformers' own (tests/golden/minilm.embed.jsonl,
//! from scripts/make-embed-goldens): cosine ≥ 0.9999 for every sentence (short, long and
//! truncated, unicode, empty), the same token counts, and the same nearest neighbours — at
//! every kernel level this CPU has (each level in its own process).

mod common;

use hearth_embed::{cosine, Embedder};

#[test]
fn minilm_matches_sentence_transformers() {
    if !common::kld::in_child_per_level("minilm_matches_sentence_transformers") {
        return;
    }
    let model = Embedder::open(&common::minilm_dir()).unwrap();
    assert_eq!(model.dim(), 384);
    assert_eq!(model.max_tokens, 256);
    let cases = common::golden_lines("minilm.embed.jsonl");
    assert!(cases.len() >= 100);
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let want: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| {
            c["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    // Batches of mixed lengths, as a server would see them.
    let got = model.embed(&texts, 16).unwrap();
    let mut worst = (1.0f64, "");
    for ((g, w), (case, text)) in got.iter().zip(&want).zip(cases.iter().zip(&texts)) {
        assert_eq!(
            g.tokens as u64,
            case["tokens"].as_u64().unwrap(),
            "{text:?}"
        );
        let c = cosine(&g.vector, w);
        if c < worst.0 {
            worst = (c, text);
        }
    }
    eprintln!("worst cosine {:.7} on {:?}", worst.0, worst.1);
    assert!(worst.0 >= 0.9999, "cosine {} on {:?}", worst.0, worst.1);
    assert!(
        got.iter().any(|e| e.truncated),
        "some golden texts exceed 256 tokens"
    );

    // Retrieval: every sentence's nearest other sentence is the same under both, except
    // where sentence-transformers' own top two are a tie closer than `TIE` (there the
    // bf16 tiles may pick either; any other choice fails).
    const TIE: f64 = 1e-3;
    let nearest = |vs: &[&[f32]], i: usize| {
        (0..vs.len())
            .filter(|&j| j != i)
            .max_by(|&a, &b| cosine(vs[i], vs[a]).total_cmp(&cosine(vs[i], vs[b])))
            .unwrap()
    };
    let ours: Vec<&[f32]> = got.iter().map(|e| e.vector.as_slice()).collect();
    let theirs: Vec<&[f32]> = want.iter().map(Vec::as_slice).collect();
    let mut ties = 0;
    for (i, text) in texts.iter().enumerate() {
        let (o, t) = (nearest(&ours, i), nearest(&theirs, i));
        if o != t {
            let gap = cosine(theirs[i], theirs[t]) - cosine(theirs[i], theirs[o]);
            assert!(
                gap < TIE,
                "neighbour of {text:?}: {o} instead of {t} (gap {gap})"
            );
            ties += 1;
        }
    }
    eprintln!(
        "nearest neighbours: {} same, {ties} other in a tie",
        texts.len() - ties
    );
    assert!(ties <= 2, "{ties} neighbours differ");
}

#[test]
fn batching_does_not_change_vectors() {
    let model = Embedder::open(&common::minilm_dir()).unwrap();
    let texts = [
        "short",
        "a somewhat longer sentence about the sea and the sky",
        "",
    ];
    let together = model.embed(&texts, 8).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let alone = model.embed(&[t], 1).unwrap();
        assert!(cosine(&alone[0].vector, &together[i].vector) > 0.999999);
    }
}
