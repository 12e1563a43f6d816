/// Reads map nodes and refcounts a page at a time, for walks that visit every entry of a map
/// (space usage) while writers run: each page is copied once, pending words included, under
/// one acquisition of its shard, instead of one shard lock per word (which made `volume list`
/// take 0.4–0.5 s under a writer on a 1 GiB volume). Like word-by-word reads, the walk is not
/// one atomic view of the map: figures reflect writes made during it, or not.
package final class PageCopies {
    let engine: PoolEngine
    private let node = UnsafeMutablePointer<UInt64>.allocate(capacity: 512)
    private var nodePage: UInt64 = .max
    /// Refcount pages copied so far (at most `maxCached`, then dropped and copied again).
    private var refcountPages: [UInt64: UnsafeMutablePointer<UInt64>] = [:]
    static let maxCached = 4096

    package init(_ engine: PoolEngine) { self.engine = engine }

    deinit {
        node.deallocate()
        for p in refcountPages.values { p.deallocate() }
    }

    /// Entry `index` of map node `node` at `level` (as `PoolEngine.entry`: throws `.io` when it
    /// fails its check).
    package func entry(node n: UInt64, index: Int, level: Int) throws(PoolError) -> UInt64 {
        let page = engine.entryOffset(node: n, index: 0)
        if page != nodePage {
            engine.journal.copyPage(page, into: node)
            nodePage = page
        }
        let raw = node[index]
        if raw == 0 { return 0 }
        guard let b = MapEntry.block(raw, index: index, level: level), engine.validBlock(b) else {
            throw PoolError(.io, "map entry \(index) of node \(n) (level \(level)) fails its check (corrupt map: run 'pmem-nbd check')")
        }
        return b
    }

    /// Block `b`'s reference count (as `PoolEngine.refcount`).
    package func refcount(_ b: UInt64) -> UInt32 {
        let off = engine.layout.refcountWordOffset(b)
        let page = off & ~UInt64(4095)
        let p: UnsafeMutablePointer<UInt64>
        if let q = refcountPages[page] {
            p = q
        } else {
            if refcountPages.count >= PageCopies.maxCached {
                for q in refcountPages.values { q.deallocate() }
                refcountPages = [:]
            }
            p = .allocate(capacity: 512)
            engine.journal.copyPage(page, into: p)
            refcountPages[page] = p
        }
        let word = p[Int((off & 4095) >> 3)]
        return RefcountSlot.decode(b, slot: RefcountSlot.slot(b, in: word))
    }
}
