//! Request JSON → sampling parameters for the OpenAI and Ollama endpoints (first byte picks
//! the endpoint). Any body gets either parameters in their checked ranges or an error in the
//! API's shape.
#![no_main]
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let endpoint = ENDPOINTS[which as usize % ENDPOINTS.len()];
    if let Ok(p) = hearth_server::check_request(endpoint, body) {
        assert!(p.temperature.is_finite() && p.temperature >= 0.0, "{p:?}");
        assert!(p.top_p.is_finite() && (0.0..=1.0).contains(&p.top_p), "{p:?}");
    }
});
