import Foundation
@testable import TestSupport
import Testing

/// The server with the standard tools users have: nbdinfo, nbdsh, nbdcopy, qemu-img, fio.
@Suite(.timeLimit(.minutes(5))) struct InteropTests {
    @Test(.enabled(if: haveTool("nbdinfo"))) func nbdinfoJSONShowsTheExportAndFlags() throws {
        let s = try TestServer()
        let r = try run(["nbdinfo", "--json", s.uri])
        #expect(r.status == 0, "\(r.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(json?["protocol"] as? String == "newstyle-fixed")
        #expect(json?["structured"] as? Bool == true)
        let export = (json?["exports"] as? [[String: Any]])?.first
        #expect(export?["export-name"] as? String == "vol0")
        #expect((export?["export-size"] as? NSNumber)?.uint64Value == s.volume.size)
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_multi_conn", "can_cache"] {
            #expect(export?[flag] as? Bool == true, "\(flag)")
        }
        #expect(export?["is_read_only"] as? Bool == false)
        #expect((export?["contexts"] as? [String])?.contains("base:allocation") == true)
        #expect((export?["block_size_maximum"] as? NSNumber)?.intValue == 32 << 20)
    }

    @Test(.enabled(if: haveTool("nbdinfo"))) func nbdinfoCanAndIs() throws {
        let s = try TestServer()
        for feature in ["connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero", "df", "multi-conn", "cache"] {
            #expect(try run(["nbdinfo", "--can", feature, s.uri]).status == 0, "can \(feature)")
        }
        #expect(try run(["nbdinfo", "--is", "read-only", s.uri]).status == 2)
        #expect(try run(["nbdinfo", "--is", "rotational", s.uri]).status == 2)
        let ro = try TestServer(readOnly: true)
        #expect(try run(["nbdinfo", "--is", "read-only", ro.uri]).status == 0)
        #expect(try run(["nbdinfo", "--can", "write", ro.uri]).status == 2)
        #expect(try run(["nbdinfo", "--can", "trim", ro.uri]).status == 2)
        #expect(try run(["nbdinfo", "--size", s.uri]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "\(s.volume.size)")
    }

    @Test(.enabled(if: haveTool("nbdinfo"))) func nbdinfoMapShowsHolesAndData() throws {
        let s = try TestServer()
        let c = try s.client()
        try c.pwrite(pattern(1 << 20, seed: 9), offset: 4 << 20)
        let r = try run(["nbdinfo", "--map", "--json", s.uri])
        #expect(r.status == 0, "\(r.stderr)")
        let map = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]] ?? []
        let shape = map.map { "\(($0["offset"] as? NSNumber)?.uint64Value ?? 0):\(($0["length"] as? NSNumber)?.uint64Value ?? 0):\($0["type"] as? Int ?? -1)" }
        #expect(shape == ["0:\(4 << 20):3", "\(4 << 20):\(1 << 20):0", "\(5 << 20):\(s.volume.size - (5 << 20)):3"])
        let list = try run(["nbdinfo", "--list", "--json", s.uri])
        #expect(list.stdout.contains("\"vol0\""))
    }

    @Test(.enabled(if: haveTool("nbdsh") && FileManager.default.fileExists(atPath: "/usr/lib/python3/dist-packages/nbd.py")))
    func nbdshScript() throws {
        let s = try TestServer()
        let script = """
        buf = b"0123456789abcdef" * 256
        h.pwrite(buf, 4096, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 4096) == buf
        h.flush()
        h.zero(4096, 4096)
        assert h.pread(4096, 4096) == bytearray(4096)
        assert h.can_multi_conn() and h.can_fast_zero() and h.can_df()
        entries = []
        h.block_status(1 << 20, 0, lambda ctx, off, e, err: entries.extend(e))
        assert entries[1] & 1 == 1, entries
        print("nbdsh-ok")
        """
        let r = try run(["nbdsh", "--base-allocation", "-u", s.uri, "-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("nbdsh-ok"))
    }

    @Test(.enabled(if: haveTool("nbdcopy"))) func nbdcopyRoundTrip() throws {
        let s = try TestServer()
        let scratch = ScratchDirectory()
        let src = scratch.file("src.img"), back = scratch.file("back.img")
        var data = pattern(8 << 20, seed: 10)
        for i in (2 << 20)..<(3 << 20) { data[i] = 0 }
        try Data(data).write(to: URL(fileURLWithPath: src))
        #expect(try run(["nbdcopy", src, s.uri]).status == 0)
        #expect(try run(["nbdcopy", s.uri, back]).status == 0)
        let copied = try Data(contentsOf: URL(fileURLWithPath: back))
        #expect(copied.count == Int(s.volume.size))
        #expect(Array(copied.prefix(data.count)) == data)
        #expect(copied.dropFirst(data.count).allSatisfy { $0 == 0 })
    }

    @Test(.enabled(if: haveTool("qemu-img"))) func qemuImgConvertAndCompare() throws {
        let s = try TestServer()
        let scratch = ScratchDirectory()
        let src = scratch.file("src.img")
        try Data(pattern(6 << 20, seed: 11)).write(to: URL(fileURLWithPath: src))
        let uri = s.uri(export: "vol0")
        let conv = try run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri])
        #expect(conv.status == 0, "\(conv.stderr)")
        let cmp = try run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri])
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(cmp.stdout.contains("Images are identical"))
        // And a changed byte is noticed.
        let c = try s.client()
        try c.pwrite([0xFF ^ pattern(1, seed: 11)[0]], offset: 0)
        #expect(try run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri]).status == 1)
    }

    @Test(.enabled(if: haveTool("fio"))) func fioVerifyCRC32C() throws {
        let s = try TestServer(size: 96 << 20)
        let r = try run(["fio", "--name=verify", "--ioengine=nbd", "--uri=\(s.uri)", "--rw=randwrite", "--bs=4k",
                         "--iodepth=32", "--size=32M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                         "--output-format=json"], timeout: 300)
        #expect(r.status == 0, "\(r.stderr)")
        // fio prints a line before the JSON document.
        let text = r.stdout.drop { $0 != "{" }
        let json = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]
        let job = (json?["jobs"] as? [[String: Any]])?.first
        #expect(job?["error"] as? Int == 0)
        let read = job?["read"] as? [String: Any]
        #expect(((read?["io_bytes"] as? NSNumber)?.intValue ?? 0) == 32 << 20, "everything written was read back and verified")
        let mixed = try run(["fio", "--name=mixed", "--ioengine=nbd", "--uri=\(s.uri)", "--rw=randrw", "--bs=64k",
                             "--iodepth=16", "--numjobs=2", "--size=16M", "--offset_increment=32M",
                             "--verify=crc32c", "--verify_fatal=1"], timeout: 300)
        #expect(mixed.status == 0, "\(mixed.stderr)")
    }
}
