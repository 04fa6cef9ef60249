// Calling fastvlm-server from a macOS app with URLSession (macOS 12+, no dependencies).
//
//   python -m fastvlm_mlx.server --model apple/FastVLM-0.5B     # listens on 127.0.0.1:8080
//
//   let client = FastVLMClient()
//   let answer = try await client.ask("What is on the table?", imageAt: photoURL)
//   for try await piece in client.stream("Describe the image.", imageAt: photoURL) { print(piece, terminator: "") }
//
// A sandboxed app needs the "Outgoing Connections (Client)" entitlement to reach localhost.

import Foundation

struct FastVLMClient {
    var baseURL = URL(string: "http://127.0.0.1:8080/v1/chat/completions")!
    var apiKey: String? = nil  // when the server runs with --api-key
    var maxTokens = 256

    private func request(_ prompt: String, imageAt imageURL: URL, stream: Bool) throws -> URLRequest {
        let image = try Data(contentsOf: imageURL).base64EncodedString()
        let body: [String: Any] = [
            "model": "fastvlm",
            "max_tokens": maxTokens,
            "stream": stream,
            "messages": [[
                "role": "user",
                "content": [
                    ["type": "text", "text": prompt],
                    ["type": "image_url", "image_url": ["url": "data:image/jpeg;base64,\(image)"]],
                ],
            ]],
        ]
        var req = URLRequest(url: baseURL)
        req.httpMethod = "POST"
        req.setValue("application/json", forHTTPHeaderField: "Content-Type")
        if let apiKey { req.setValue("Bearer \(apiKey)", forHTTPHeaderField: "Authorization") }
        req.httpBody = try JSONSerialization.data(withJSONObject: body)
        return req
    }

    /// The whole answer. Errors come back as {"error": {"message", "type", "param", "code"}}.
    func ask(_ prompt: String, imageAt imageURL: URL) async throws -> String {
        let (data, response) = try await URLSession.shared.data(for: request(prompt, imageAt: imageURL, stream: false))
        let json = try JSONSerialization.jsonObject(with: data) as? [String: Any] ?? [:]
        guard (response as? HTTPURLResponse)?.statusCode == 200 else {
            let error = json["error"] as? [String: Any]
            throw NSError(domain: "FastVLM", code: (response as? HTTPURLResponse)?.statusCode ?? 0,
                          userInfo: [NSLocalizedDescriptionKey: error?["message"] as? String ?? "request failed"])
        }
        if let timings = json["timings"] as? [String: Any] {
            print("TTFT \(timings["ttft_ms"] ?? "?") ms")  // and vision_ms, prefill_ms, decode_tps, ...
        }
        let choice = (json["choices"] as? [[String: Any]])?.first
        return (choice?["message"] as? [String: Any])?["content"] as? String ?? ""
    }

    /// The answer as it is generated (server-sent events: `data: {...}` lines, then `data: [DONE]`).
    /// Cancelling the task closes the connection, and the server stops generating.
    func stream(_ prompt: String, imageAt imageURL: URL) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    let (bytes, _) = try await URLSession.shared.bytes(for: request(prompt, imageAt: imageURL, stream: true))
                    for try await line in bytes.lines where line.hasPrefix("data: ") {
                        let payload = line.dropFirst(6)
                        if payload == "[DONE]" { break }
                        let chunk = try JSONSerialization.jsonObject(with: Data(payload.utf8)) as? [String: Any]
                        let delta = ((chunk?["choices"] as? [[String: Any]])?.first?["delta"]) as? [String: Any]
                        if let text = delta?["content"] as? String, !text.isEmpty { continuation.yield(text) }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
