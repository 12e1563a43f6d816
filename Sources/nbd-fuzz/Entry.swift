import Glibc

#if FUZZING
/// The libFuzzer entry point: a failed check is a crash, which libFuzzer saves as a reproducer.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    do throws(FuzzFailure) {
        try converse(UnsafeRawBufferPointer(start: data, count: size))
    } catch {
        fatalError("nbd-fuzz: \(error)")
    }
    return 0
}

#else
/// Replays the files named on the command line (a corpus directory's files, or crashes).
@main struct Replay {
    static func main() {
        var failed = 0
        let files = CommandLine.arguments.dropFirst()
        for path in files {
            guard let f = fopen(path, "rb") else {
                print("nbd-fuzz: cannot open \(path)")
                failed += 1
                continue
            }
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&chunk, 1, chunk.count, f)
                if n <= 0 { break }
                bytes += chunk[0..<n]
            }
            fclose(f)
            let result = bytes.withUnsafeBytes { b in Result { () throws(FuzzFailure) in try converse(b) } }
            if case .failure(let error) = result {
                print("nbd-fuzz: \(path): \(error)")
                failed += 1
            }
        }
        print("nbd-fuzz: \(files.count) inputs replayed, \(failed) failed")
        exit(failed == 0 ? 0 : 1)
    }
}
#endif
