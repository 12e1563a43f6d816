/*
 * The mapping-change feed's lease protocol, for spin. Docs/FEED.md, "The model", maps every
 * part of it to the code; scripts/model-check runs it.
 *
 * One volume V (id 1) of one virtual block, at most one snapshot of it at a time (ids 2, 3, ...:
 * a deleted snapshot's name can be reused, its id is not), NB = 3 physical blocks (1..3; 0 is
 * a hole), two clients. Processes:
 *
 *   Writer      NBD writes and trims of V (Volume.write / Volume.unmap)
 *   SnapOps     snapshot create / delete, rollback (Pool.createSnapshot / delete / rollback)
 *   Deleter     frees the blocks of deleted maps (Deleter, Pool.deleteStep)
 *   Reaper      the ack-deadline fence (FeedHub.reaper)
 *   Session(c)  the reader thread of client c's feed connection on the server (FeedSession.reader,
 *               handle; FeedHub.register / unregister; read grants)
 *   Worker(c)   its worker thread: write-lease grants (FeedSession.worker, FeedHub.grant)
 *   Feed(c)     the client library's feed thread (DAXPool.receiveLoop) and its recall thread
 *               (DAXWriteLease.recall); it reads what the session's writer thread sends
 *               (FeedSession.writer)
 *   Holder0/1   the application: loans (DAXVolume.withMappedBlock), copies (DAXVolume.read),
 *               write leases (DAXVolume.writeLease, DAXWriteLease), a crash and a new process
 *   Monitor     once nothing can move any more: every holder was told
 *
 * The protocol modelled is the one of the issue 14 fixes (branch dax-coherence), plus three
 * changes they do not have (as of dax-coherence edd1e16), marked FIX below. The assertions name
 * the guarantees of Docs/FEED.md (G1-G9) they check. Compile-time switches put the known bugs
 * back, one at a time (negative controls: spin must find each):
 *   BUG_SNAPSHOT_PIN    snapshot deletion holds frees only for the parent's read leases (issue 14 item 1)
 *   BUG_EARLY_RECALL    a RECALL before the handle is registered is returned behind the holder's back (item 2)
 *   BUG_FENCE_HIDDEN    the recall drops the handle, so FENCED never reaches it (item 3)
 *   BUG_ROLLBACK_ORDER  the deleter may free the old map between the rollback's swap and its event (item 6)
 *   BUG_DELETE_ORDER    the same for a snapshot deletion
 *   BUG_EARLY_EVENT     rollback event first, map swap later (a grant in between sees the old map)
 *   BUG_FENCE_RACE      the fence as on main: the lease is dropped and others move on before the
 *                       fencer has moved its block away (a failure to move it is only logged)
 *   BUG_DOUBLE_GRANT    the write grant does not check other write leases again after its copy-on-write
 *                       (undoes FIX 1)
 *   BUG_SILENT_FENCE    a session fenced while it holds no lease is not told
 *                       (undoes FIX 2)
 *   BUG_RESERVE_FIRST   a write reserves its blocks before beginMove: a fence it makes waits for
 *                       space it holds itself (undoes FIX 3)
 */

#ifndef CONFIG
#define CONFIG 1
#endif

#define NB 3           /* physical blocks 1..NB */
#define NC 2           /* clients */
#define NL 7           /* lease ids 1..NL */
#define NE 12          /* event sequence numbers 1..NE */
#define OB 4           /* server->client messages queued per session */
#define MAXST 1        /* stores per write lease: each store is checked where it happens and a
                          store can happen at any point, so more add states, not behaviours */
#define V 1            /* the volume's id */

/* ---------------------------------------------------------------- configurations */

/* INIT_V, INIT_S: V's block and the snapshot's (0: no snapshot) at the start. WRITES, TRIMS:
 * NBD writes and trims of V. SNAP_SCRIPT: createSnap(), deleteSnap(), rollback(). Hc_SCRIPT:
 * loan(KEY_V), loan(KEY_S) (withMappedBlock; KEY_S: the snapshot handle opened by openSnap()),
 * copy(KEY_V) (read), renew(KEY_V) (a second lease over a leased region), writeLease(),
 * crash() (the process dies, a new one connects). CRASHESc: the holder may also die during a
 * loan or a write lease. READSc = 0: the client never takes a read lease (it gets nothing from
 * events then, so the model lets it skip them). ACKFENCE: the reaper's ack-deadline fence. */
#if CONFIG == 0        /* the caller defines everything (scripts/model-check --custom) */
#elif CONFIG == 1      /* snapshot: loans on a snapshot alone, its deletion, a new one of the same name */
#define INIT_V 2
#define INIT_S 1
#define WRITES 1
#define SNAP_SCRIPT deleteSnap(); createSnap()
#define H0_SCRIPT openSnap(); loan(KEY_S); loan(KEY_S)
#define H1_SCRIPT loan(KEY_V)
#elif CONFIG == 2      /* rollback: loans of the volume across a rollback, the ack deadline */
#define INIT_V 2
#define INIT_S 1
#define WRITES 1
#define ACKFENCE 1
#define READS1 0
#define SNAP_SCRIPT rollback()
#define H0_SCRIPT loan(KEY_V); loan(KEY_V)
#elif CONFIG == 3      /* copy: validated copies and loans across a rollback */
#define INIT_V 2
#define INIT_S 1
#define WRITES 1
#define SNAP_SCRIPT rollback()
#define H0_SCRIPT loan(KEY_V); loan(KEY_V)
#define H1_SCRIPT copy(KEY_V)
#elif CONFIG == 4      /* write: a write lease recalled by a write and a snapshot; a reader */
#define WRITES 1
#define READS1 0
#define SNAP_SCRIPT createSnap()
#define H0_SCRIPT loan(KEY_V)
#define H1_SCRIPT writeLease()
#elif CONFIG == 5      /* writers: two write-lease holders, one crashes and comes back; a trim */
#define TRIMS 1
#define READS0 0
#define READS1 0
#define CRASHES1 1
#define H0_SCRIPT writeLease()
#define H1_SCRIPT writeLease(); writeLease()
#elif CONFIG == 6      /* reconnect: a reader that may crash mid-loan, a renewal, a write lease */
#define WRITES 1
#define READS1 0
#define CRASHES0 1
#define H0_SCRIPT loan(KEY_V); renew(KEY_V); loan(KEY_V)
#define H1_SCRIPT writeLease()
#elif CONFIG == 11     /* long: snapshot with a write lease */
#define INIT_V 2
#define INIT_S 1
#define WRITES 1
#define SNAP_SCRIPT deleteSnap(); createSnap()
#define H0_SCRIPT openSnap(); loan(KEY_S); loan(KEY_S)
#define H1_SCRIPT writeLease(); loan(KEY_V)
#elif CONFIG == 12     /* long: rollback with loans, a copy and the ack deadline */
#define INIT_V 2
#define INIT_S 1
#define WRITES 1
#define ACKFENCE 1
#define SNAP_SCRIPT rollback()
#define H0_SCRIPT loan(KEY_V); loan(KEY_V)
#define H1_SCRIPT copy(KEY_V)
#elif CONFIG == 13     /* long: rollback recalling a write lease; loans, a copy */
#define INIT_V 2
#define INIT_S 1
#define WRITES 1
#define SNAP_SCRIPT rollback()
#define H0_SCRIPT loan(KEY_V); copy(KEY_V)
#define H1_SCRIPT writeLease()
#elif CONFIG == 14     /* long: write leases, a snapshot, a crash, a reader */
#define WRITES 1
#define READS1 0
#define CRASHES1 1
#define SNAP_SCRIPT createSnap()
#define H0_SCRIPT loan(KEY_V); loan(KEY_V)
#define H1_SCRIPT writeLease(); writeLease()
#elif CONFIG == 15     /* long: reconnect with two writes */
#define WRITES 2
#define READS1 0
#define CRASHES0 1
#define H0_SCRIPT loan(KEY_V); renew(KEY_V); loan(KEY_V)
#define H1_SCRIPT writeLease()
#endif

#ifndef INIT_V
#define INIT_V 1
#endif
#ifndef INIT_S
#define INIT_S 0
#endif
#ifndef WRITES
#define WRITES 0
#endif
#ifndef TRIMS
#define TRIMS 0
#endif
#ifndef ACKFENCE
#define ACKFENCE 0
#endif
#ifndef SNAP_SCRIPT
#define SNAP_SCRIPT skip
#endif
#ifndef H0_SCRIPT
#define H0_SCRIPT skip
#endif
#ifndef H1_SCRIPT
#define H1_SCRIPT skip
#endif
#ifndef CRASHES0
#define CRASHES0 0
#endif
#ifndef CRASHES1
#define CRASHES1 0
#endif
#ifndef READS0
#define READS0 1
#endif
#ifndef READS1
#define READS1 1
#endif
#define MAYCRASH(x) ((x) == 0 && CRASHES0 || (x) == 1 && CRASHES1)
#define READER(x) ((x) == 0 && READS0 || (x) == 1 && READS1)

/* ---------------------------------------------------------------- constants */

mtype = { HELLO, BYE, LEASE, RELEASE, RETURN, GRANTED, DENIED, RECALL, FENCEDMSG };

#define EV_REMAP 1
#define EV_SNAPC 4
#define EV_SNAPD 5
#define EV_ROLLBACK 6

#define RD 1
#define WR 2

/* server-side lease states; a lease that ended otherwise is forgotten (RETIRE) */
#define LS_NONE 0
#define LS_ACTIVE 1
#define LS_FENCED 2     /* fenced; its block is still to be moved away from the volume */
#define LS_FDONE 3      /* fenced; moved away, FENCED sent */

/* requests: which region a read lease is for, or a write lease */
#define KEY_V 0
#define KEY_S 1
#define KEY_W 2

/* ---------------------------------------------------------------- the pool (server) */

byte seq;                                   /* newest event = the status page word */
byte evk[NE+1]; byte eva[NE+1]; byte evn[NE+1];   /* kind, aux (snapshot id), new block */

byte vmap;                                  /* V's block (0 = hole) */
byte smap;                                  /* the snapshot's block */
byte snapId;                                /* the snapshot's id, 0 = none */
byte nextSnap = 2;
byte dead[NB+1];                            /* references of maps being deleted */
byte deadHeld[NB+1];                        /* ... that the deleter must leave alone for now */
bool reserved[NB+1];                        /* taken by a write in flight */
byte heldBy[NB+1];                          /* bit c: freed while session c held frees back */
byte moving;                                /* moves registered over V (FeedHub.moves) */
byte relocating;                            /* ... of which relocations (FeedHub.relocations) */

#define RC(b) ((vmap == (b) -> 1 : 0) + (smap == (b) -> 1 : 0) + dead[b] + deadHeld[b])
#define PINNEDBY(c, b) (sb[c].pinseq[b] > acked[c] || sb[c].fpin[b])
#define PINNED(b) (PINNEDBY(0, b) || PINNEDBY(1, b))
#define REUSABLE(b) (RC(b) == 0 && !reserved[b] && heldBy[b] == 0 && !PINNED(b))
#define ANYREUSABLE (REUSABLE(1) || REUSABLE(2) || REUSABLE(3))

/* the feed hub, per session */
bool alive[NC];                             /* registered (not closed) */
byte sinc[NC];                              /* incarnation: one per connection */
bool fenced[NC];
byte acked[NC];
byte cursor[NC];                            /* the next event its writer thread sends */
bool hold[NC]; byte holdUntil[NC];          /* FeedSession.holdFrees */
typedef PerBlock { byte pinseq[NB+1]; bool fpin[NB+1] }
PerBlock sb[NC];                            /* pins (sequence that took them), fenced pins */
typedef Outbox { byte k[OB]; byte lease[OB]; byte blk[OB]; byte q[OB]; byte head; byte n }
Outbox ob[NC];                              /* FeedSession.outbox; q: the sequence when queued */
chan toServer[NC] = [4] of { mtype, byte, byte };
chan work[NC] = [1] of { byte };            /* write-lease requests for the worker */

typedef Lease { byte mode; byte cli; byte inc; byte vol; byte st; bool recalled; byte blk }
Lease L[NL+1];
byte nextLease = 1;

/* ---------------------------------------------------------------- the clients */

byte cinc[NC];                              /* client incarnation (crashes) */
byte processed[NC]; byte cacked[NC];
typedef Region { bool valid; byte lease; byte vol; byte blk; byte since; byte changed }
Region reg[4];                              /* reg[2c + KEY_V], reg[2c + KEY_S] */
byte snapHandle[NC];                        /* the snapshot id the client opened */
byte pendKey[NC]; byte repKind[NC]; byte repLease[NC]; byte repBlk[NC];
bool loanOn[NC]; byte loanStart[NC]; byte loanBlk[NC];
bool copyOn[NC]; byte copyBlk[NC]; bool copyStale[NC];
bool storing[NC]; byte wl[NC]; byte wblk[NC];   /* the holder may store into wblk (lease wl) */
byte retPending[NC];                        /* a recall thread waiting for the stores to stop */
typedef Handle { bool exists; bool told; bool fenced; bool released }
Handle hd[NL+1];                            /* DAXWriteLease, by lease id (told: onRecall ran) */
bool loanLost[NC]; bool fencedSeen[NC];     /* ghosts for the final check */

/* ---------------------------------------------------------------- hub helpers (hub lock held) */

/* A lease that ended (returned, released, ended by the server) is forgotten: a late RETURN or
 * RELEASE for it is ignored, and nothing else refers to it. Fenced leases stay (final check). */
#define RETIRE(x) L[x].mode = 0; L[x].cli = 0; L[x].inc = 0; L[x].vol = 0; L[x].st = LS_NONE; L[x].recalled = 0; L[x].blk = 0

inline append(ek, eaux, nw) {
  assert(seq < NE);
  seq++;
  evk[seq] = ek; eva[seq] = eaux; evn[seq] = nw
}

inline push(pc, kind, ls, bl) {
  assert(ob[pc].n < OB);
  ob[pc].k[(ob[pc].head + ob[pc].n) % OB] = kind;
  ob[pc].lease[(ob[pc].head + ob[pc].n) % OB] = ls;
  ob[pc].blk[(ob[pc].head + ob[pc].n) % OB] = bl;
  ob[pc].q[(ob[pc].head + ob[pc].n) % OB] = seq;
  ob[pc].n++
}

inline hasReadLease(hc, hv, hres) {
  hres = 0;
  for (j : 1 .. NL) {
    if
    :: L[j].mode == RD && L[j].cli == hc && L[j].st == LS_ACTIVE && L[j].vol == hv -> hres = 1
    :: else -> skip
    fi
  };
  skip
}

/* FeedHub.willRemap (under the map lock, before the map changes): the event; the sessions with
 * a read lease over the block pin its old physical block. */
inline willRemap(o, nw) {
  append(EV_REMAP, 0, nw);
  if
  :: o != 0 && o != nw ->
     for (i : 0 .. NC-1) {
       hasReadLease(i, V, has);
       if
       :: alive[i] && !fenced[i] && has -> sb[i].pinseq[o] = seq
       :: else -> skip
       fi
     }
  :: else -> skip
  fi;
  has = 0
}

/* A reference to b went away; the last one frees it (Allocator.freed, committed): it is held
 * back for every session holding frees back (its read epoch). */
inline dropRef(b) {
  if
  :: b != 0 && RC(b) == 0 -> heldBy[b] = (hold[0] -> 1 : 0) | (hold[1] -> 2 : 0)
  :: else -> skip
  fi
}

inline holdFrees(hc) {
  hold[hc] = 1;
  if :: holdUntil[hc] < seq -> holdUntil[hc] = seq :: else -> skip fi
}

inline endHold(hc) {
  hold[hc] = 0; holdUntil[hc] = 0;
  for (j : 1 .. NB) { heldBy[j] = heldBy[j] & (3 - (1 << hc)) };
  skip
}

/* Allocator.reserve: a reusable block, any one (the allocator's stack hands out the block
 * freed last). Inside atomic, followed by taken(). */
inline choose(res) {
  if
  :: REUSABLE(1) -> res = 1
  :: REUSABLE(2) -> res = 2
  :: REUSABLE(3) -> res = 3
  :: else -> res = 0
  fi
}

/* Block res is reused: the first invariant. */
inline taken(res) {
  if
  :: res != 0 ->
     reserved[res] = 1;
     for (i : 0 .. NC-1) {
       /* G2, G3: a lent block is reused only once its session is fenced (which it must be told: G7) */
       assert(!(loanOn[i] && loanBlk[i] == res) || fenced[i]);
       if :: loanOn[i] && loanBlk[i] == res -> loanLost[i] = 1 :: else -> skip fi;
       /* G3, G7: never a block a write-lease holder may still store into (a fenced one's is pinned) */
       assert(!(storing[i] && wblk[i] == res));
       /* a copy from it must not be accepted (checked by the reader) */
       if :: copyOn[i] && copyBlk[i] == res -> copyStale[i] = 1 :: else -> skip fi
     }
  :: else -> skip
  fi
}

/* The remap of a write of V into block nb (Volume.writeChunk, under the map lock). */
inline remap(nb) {
  old = vmap; willRemap(old, nb); vmap = nb; reserved[nb] = 0; dropRef(old); old = 0
}

/* FeedHub.fence: every lease of the session is void. Read leases get FENCED at once; a write
 * lease's block stays pinned until the session goes (fencedPins) and is moved away from the
 * volume by the fencer (finishFence), under a relocation move every other move waits for;
 * FENCED follows. The session's pins and its free hold go. */
inline fence(fc) {
  if
  :: !fenced[fc] ->
     fenced[fc] = 1;
#ifndef BUG_SILENT_FENCE
     push(fc, FENCEDMSG, 0, 0);             /* FIX 2: the session itself is told, leases or not */
#endif
     for (j : 1 .. NL) {
       if
       :: L[j].cli == fc && L[j].st == LS_ACTIVE ->
          if
          :: L[j].mode == WR ->
             sb[fc].fpin[L[j].blk] = 1;
#ifdef BUG_FENCE_RACE
             L[j].st = LS_FDONE;            /* main: dropped, FENCED at once, moved later */
             push(fc, FENCEDMSG, j, 0)
#else
             L[j].st = LS_FENCED; moving++; relocating++
#endif
          :: else -> push(fc, FENCEDMSG, j, 0); RETIRE(j)
          fi
       :: else -> skip
       fi
     };
     for (j : 1 .. NB) { sb[fc].pinseq[j] = 0 };
     endHold(fc)
  :: else -> skip
  fi
}

/* FeedHub.finishFence: the fencer moves the block of the fenced write lease of client fc away
 * (Volume.relocate: copied to a new block), then sends FENCED. Without space it waits (the
 * code tries every 50 ms). Main (BUG_FENCE_RACE): no wait, a failure is only logged. */
inline finishFence(fc) {
  d_step {
    rl = 0;
    for (j : 1 .. NL) {
      if
#ifdef BUG_FENCE_RACE
      :: rl == 0 && L[j].cli == fc && L[j].st == LS_FDONE && L[j].blk != 0 -> rl = j
#else
      :: rl == 0 && L[j].cli == fc && L[j].st == LS_FENCED -> rl = j
#endif
      :: else -> skip
      fi
    }
  };
  if
  :: rl != 0 ->
#ifdef BUG_FENCE_RACE
     atomic { choose(nb); d_step { taken(nb); if :: nb != 0 -> remap(nb) :: else -> skip fi; L[rl].blk = 0; nb = 0; rl = 0 } }
#else
     atomic {
       ANYREUSABLE -> choose(nb);
       d_step {
         assert(vmap == L[rl].blk);         /* nothing moved it meanwhile */
         taken(nb); remap(nb); nb = 0;
         L[rl].st = LS_FDONE; moving--; relocating--;
         if :: L[rl].inc == sinc[fc] && alive[fc] -> push(fc, FENCEDMSG, rl, 0) :: else -> skip fi;
         rl = 0
       }
     }
#endif
  :: else -> skip
  fi
}

/* The write lease a move over V waits for (0 = none): one not given back. */
#define CONFLICTS(x) (L[x].mode == WR && L[x].st == LS_ACTIVE)
inline findConflict(cf) {
  cf = 0;
  for (j : 1 .. NL) {
    if
    :: cf == 0 && CONFLICTS(j) -> cf = j
    :: else -> skip
    fi
  };
  skip
}

/* FeedHub.beginMove over V: registers the move; recalls each conflicting write lease and
 * waits for its return; a holder that misses the deadline (at any time after the recall: the
 * model has no clock) is fenced and its block moved away by this mover; then it waits for
 * every relocation of the range to end. */
inline beginMove() {
  d_step { moving++; findConflict(cf) };
  do
  :: cf == 0 -> break
  :: d_step { cf != 0 && L[cf].st == LS_ACTIVE && !L[cf].recalled ->
       L[cf].recalled = 1; tc = L[cf].cli; push(tc, RECALL, cf, 0); findConflict(cf); tc = 0 }
  :: d_step { cf != 0 && L[cf].st == LS_ACTIVE && L[cf].recalled ->   /* the deadline passes */
       tc = L[cf].cli; fence(tc) };
     finishFence(tc);
     d_step { tc = 0; findConflict(cf) }
  :: d_step { cf != 0 && !CONFLICTS(cf) -> findConflict(cf) }
  od;
#ifndef BUG_FENCE_RACE
  (relocating == 0)
#else
  skip
#endif
}

/* ---------------------------------------------------------------- server processes */

proctype Writer() {
  byte w, t, nb, old, cf, tc, rl, i, j; bool has;
  do
  :: w < WRITES ->                                  /* Volume.write */
     w++;
#ifdef BUG_RESERVE_FIRST
     /* dax-coherence: reserve, then beginMove (a fence it makes waits for space it holds) */
     atomic { choose(nb); d_step { taken(nb) } };
     if
     :: nb != 0 ->
        beginMove();
        d_step { remap(nb); moving--; nb = 0; cf = 0 }
     :: else -> skip                                /* ENOSPC */
     fi
#else
     /* FIX 3: beginMove, then reserve (a write waiting for a recall holds no space) */
     beginMove();
     atomic { choose(nb); d_step { taken(nb); if :: nb != 0 -> remap(nb) :: else -> skip fi; moving--; nb = 0; cf = 0 } }
#endif
  :: t < TRIMS ->                                   /* Volume.unmap */
     t++;
     beginMove();
     d_step {
       if :: vmap != 0 -> old = vmap; willRemap(old, 0); vmap = 0; dropRef(old); old = 0 :: else -> skip fi;
       moving--; cf = 0
     }
  :: w == WRITES && t == TRIMS -> break
  od
}

inline createSnap() {                               /* Pool.createSnapshot */
  beginMove();
  d_step {
    if
    :: snapId == 0 -> smap = vmap; snapId = nextSnap; nextSnap++; append(EV_SNAPC, snapId, 0)
    :: else -> skip
    fi;
    moving--; cf = 0
  }
}

/* FeedHub.volumeChanged(.snapshotDeleted): the event; every session with a read lease on the
 * snapshot holds frees back until it acknowledges; the leases on it end. */
inline snapDeletedEvent(sid) {
  append(EV_SNAPD, sid, 0);
  for (i : 0 .. NC-1) {
#ifdef BUG_SNAPSHOT_PIN
    hasReadLease(i, V, has);                        /* main: the parent's lease holders */
#else
    hasReadLease(i, sid, has);
#endif
    if :: alive[i] && !fenced[i] && has -> holdFrees(i) :: else -> skip fi
  };
  has = 0;
  for (j : 1 .. NL) { if :: L[j].vol == sid && L[j].st == LS_ACTIVE -> RETIRE(j) :: else -> skip fi };
  skip
}

/* Pool.delete of the snapshot: marked deleting (its map held from the deleter), the event,
 * then the map goes to the deleter (releaseToDeleter). */
inline deleteSnap() {
  d_step {
    sid = snapId;
    if
    :: sid != 0 ->
#ifdef BUG_DELETE_ORDER
       if :: smap != 0 -> dead[smap]++ :: else -> skip fi;     /* main: the deleter may start now */
#else
       if :: smap != 0 -> deadHeld[smap]++ :: else -> skip fi;
#endif
       held = smap; smap = 0; snapId = 0
    :: else -> skip
    fi
  };
  d_step {
    if :: sid != 0 -> snapDeletedEvent(sid) :: else -> skip fi;
#ifndef BUG_DELETE_ORDER
    if :: held != 0 -> deadHeld[held]--; dead[held]++ :: else -> skip fi;
#endif
    sid = 0; held = 0
  }
}

/* FeedHub.volumeChanged(.rollback): the event; every session with a read lease on the volume
 * holds frees back until it acknowledges; the read leases on it end. */
inline rollbackEvent(sid) {
  append(EV_ROLLBACK, sid, 0);
  for (i : 0 .. NC-1) {
    hasReadLease(i, V, has);
    if :: alive[i] && !fenced[i] && has -> holdFrees(i) :: else -> skip fi
  };
  has = 0;
  for (j : 1 .. NL) { if :: L[j].vol == V && L[j].mode == RD && L[j].st == LS_ACTIVE -> RETIRE(j) :: else -> skip fi };
  skip
}

/* Pool.rollback: beginMove; the map swap (the old map becomes a record held from the
 * deleter); the event; the old map goes to the deleter. */
inline rollback() {
  beginMove();
#ifdef BUG_EARLY_EVENT
  d_step { sid = snapId; if :: sid != 0 -> rollbackEvent(sid) :: else -> skip fi };
  d_step {
    if :: sid != 0 -> held = vmap; vmap = smap; if :: held != 0 -> dead[held]++ :: else -> skip fi :: else -> skip fi;
    moving--; cf = 0; sid = 0; held = 0
  }
#else
  d_step {
    sid = snapId;
    if
    :: sid != 0 ->
       held = vmap; vmap = smap;
#ifdef BUG_ROLLBACK_ORDER
       if :: held != 0 -> dead[held]++ :: else -> skip fi       /* main: the deleter may start now */
#else
       if :: held != 0 -> deadHeld[held]++ :: else -> skip fi
#endif
    :: else -> skip
    fi
  };
  d_step {
    if :: sid != 0 -> rollbackEvent(sid) :: else -> skip fi;
#ifndef BUG_ROLLBACK_ORDER
    if :: held != 0 -> deadHeld[held]--; dead[held]++ :: else -> skip fi;
#endif
    moving--; cf = 0; sid = 0; held = 0
  }
#endif
}

proctype SnapOps() {
  byte nb, old, cf, tc, rl, sid, held, i, j; bool has;
  SNAP_SCRIPT
}

proctype Deleter() {                                /* Deleter, Pool.deleteStep */
  byte b;
end:
  do
  :: d_step { dead[1] > 0 -> dead[1]--; b = 1; dropRef(b); b = 0 }
  :: d_step { dead[2] > 0 -> dead[2]--; b = 2; dropRef(b); b = 0 }
  :: d_step { dead[3] > 0 -> dead[3]--; b = 3; dropRef(b); b = 0 }
  od
}

/* FeedHub.reaper: a session that leaves an event unacknowledged past the ack deadline (one
 * that pinned a block, or one that holds frees back; at any time: no clock) is fenced; its
 * write lease's block is moved away (finishFenceElsewhere). */
#define OUTSTANDING(c) (sb[c].pinseq[1] > acked[c] || sb[c].pinseq[2] > acked[c] || sb[c].pinseq[3] > acked[c] || hold[c])
proctype Reaper() {
  byte c, nb, old, rl, i, j; bool has;
end:
  do
  :: d_step { alive[0] && !fenced[0] && OUTSTANDING(0) -> c = 0; fence(c) }; finishFence(c); c = 0
  :: d_step { alive[1] && !fenced[1] && OUTSTANDING(1) -> c = 1; fence(c) }; finishFence(c); c = 0
  od
}

/* ---------------------------------------------------------------- the server's session */

/* FeedHub.grant of a read lease: under the map lock and the hub lock, the range's current
 * blocks and the sequence they are consistent with; refused to a fenced session or for a
 * volume no longer live. */
inline grantRead(gkey, gvol) {
  if
  :: !fenced[c] && gkey == KEY_V ->
     assert(nextLease <= NL); l = nextLease; nextLease++;
     L[l].mode = RD; L[l].cli = c; L[l].inc = sinc[c]; L[l].vol = V; L[l].st = LS_ACTIVE;
     push(c, GRANTED, l, vmap)
  :: !fenced[c] && gkey == KEY_S && gvol == snapId && snapId != 0 ->
     assert(nextLease <= NL); l = nextLease; nextLease++;
     L[l].mode = RD; L[l].cli = c; L[l].inc = sinc[c]; L[l].vol = gvol; L[l].st = LS_ACTIVE;
     push(c, GRANTED, l, smap)
  :: else -> push(c, DENIED, 0, 0)
  fi;
  l = 0
}

/* FeedSession.reader: requests that never wait are handled at once; a write LEASE goes to the
 * worker. HELLO stands for the new connection (WELCOME, SUBSCRIBE from its sequence), BYE for
 * its end (FeedHub.unregister). */
proctype Session(byte c) {
  mtype k; byte a, b, l, i, j;
end:
  do
  :: atomic {
       toServer[c]?k,a,b ->
       if
       :: k == LEASE && a == KEY_W -> work[c]!sinc[c]
       :: else ->
          d_step {
            if
            :: k == HELLO ->
               alive[c] = 1; sinc[c]++; fenced[c] = 0; acked[c] = 0; cursor[c] = seq + 1;
               processed[c] = seq; cacked[c] = seq
            :: k == BYE ->
               alive[c] = 0;
               for (j : 1 .. NL) { if :: L[j].cli == c && L[j].st == LS_ACTIVE -> RETIRE(j) :: else -> skip fi };
               for (j : 1 .. NB) { sb[c].pinseq[j] = 0; sb[c].fpin[j] = 0 };
               endHold(c);
               fenced[c] = 0; acked[c] = 0; cursor[c] = 255;
               for (j : 0 .. OB-1) { ob[c].k[j] = 0; ob[c].lease[j] = 0; ob[c].blk[j] = 0; ob[c].q[j] = 0 };
               ob[c].n = 0; ob[c].head = 0
            :: k == RELEASE || k == RETURN ->
               if
               :: L[a].cli == c && L[a].inc == sinc[c] && L[a].st == LS_ACTIVE ->
                  /* G6: the server takes a write lease back only from a holder that knows (onRecall ran, or it released) */
                  assert(L[a].mode == RD || hd[a].told || hd[a].released);
                  RETIRE(a)
               :: else -> skip                      /* fenced or ended already */
               fi
            :: k == LEASE -> grantRead(a, b)
            fi;
            k = 0; a = 0; b = 0
          }
       fi;
       k = 0; a = 0; b = 0
     }
  od
}

#ifdef BUG_DOUBLE_GRANT
#define RECHECK 0
#else
#define RECHECK (cf != 0)
#endif
#define OPEN (alive[c] && sinc[c] == inc)   /* the connection the request came on is still there */

/* FeedSession.worker answering a write LEASE (FeedHub.grant): refused to a fenced session or
 * while another write lease covers the range; waits for the moves over the range; registers a
 * relocation move for the copy-on-write (makeExclusive, a write not announced: the relocation
 * holds the range alone); then, under the map lock, grants if nothing moves and the block is
 * the volume's own (two attempts here, four in the code). A closed session gets nothing. */
proctype Worker(byte c) {
  byte inc, att, res, nb, old, cf, l, i, j; bool ok, has;
end:
  do
  :: work[c]?inc ->
     att = 0;
     do
     :: att == 2 -> d_step { if :: OPEN -> push(c, DENIED, 0, 0) :: else -> skip fi }; break
     :: att < 2 ->
        d_step {
          findConflict(cf);
          res = (OPEN && !fenced[c] && cf == 0 -> 1 : 0);
          if :: OPEN && res == 0 -> push(c, DENIED, 0, 0) :: else -> skip fi;
          cf = 0
        };
        if :: res == 0 -> break :: else -> skip fi;
        d_step { moving == 0 -> moving++; relocating++; ok = (vmap != 0 && RC(vmap) == 1) };
        if
        :: !ok -> atomic { choose(nb); d_step { taken(nb); if :: nb != 0 -> remap(nb); ok = 1 :: else -> skip fi; nb = 0 } }
        :: else -> skip
        fi;
        d_step {
          moving--; relocating--;
          if
          :: !ok -> if :: OPEN -> push(c, DENIED, 0, 0) :: else -> skip fi; res = 2      /* ENOSPC */
          :: else ->
             findConflict(cf);
             if
             :: !OPEN -> res = 2
             :: OPEN && fenced[c] -> push(c, DENIED, 0, 0); res = 2
             :: OPEN && !fenced[c] && moving > 0 -> att++; res = 0
             :: OPEN && !fenced[c] && moving == 0 && RECHECK -> push(c, DENIED, 0, 0); res = 2   /* FIX 1 */
             :: OPEN && !fenced[c] && moving == 0 && !RECHECK && vmap != 0 && RC(vmap) == 1 ->
                /* G5: at most one write lease covers a block */
                assert(cf == 0);
                assert(nextLease <= NL); l = nextLease; nextLease++;
                L[l].mode = WR; L[l].cli = c; L[l].inc = sinc[c]; L[l].vol = V; L[l].st = LS_ACTIVE; L[l].blk = vmap;
                push(c, GRANTED, l, vmap); res = 2
             :: else -> att++; res = 0
             fi
          fi;
          cf = 0; l = 0; ok = 0
        };
        if :: res == 2 -> break :: else -> skip fi
     od;
     skip;
     d_step { att = 0; res = 0; inc = 0 }
  od
}

/* ---------------------------------------------------------------- the client library */

/* DAXPool.acknowledgeable + ACK: everything processed, but nothing after the start of a loan.
 * The server applies the ACK as it is sent (FeedSession.acknowledge): an ACK delayed on the
 * socket only keeps pins and holds longer, so applying it at once is the harder case and saves
 * the model a step. */
inline tryAck() {
  lim = processed[c];
  if :: loanOn[c] && loanStart[c] < lim -> lim = loanStart[c] :: else -> skip fi;
  if
  :: lim > cacked[c] ->
     cacked[c] = lim;
     if
     :: alive[c] && sinc[c] == cinc[c] && !fenced[c] ->
        if :: lim > acked[c] -> acked[c] = lim :: else -> skip fi;   /* pins through it go */
        if :: hold[c] && acked[c] >= holdUntil[c] -> endHold(c) :: else -> skip fi
     :: else -> skip
     fi
  :: else -> skip
  fi;
  lim = 0
}

#define CONNECTED (alive[c] && sinc[c] == cinc[c])
#define HEADQ ob[c].q[ob[c].head]

/* DAXPool.receiveLoop. It reads what FeedSession.writer sends: the outbox in order, and the
 * events; a frame queued at sequence q precedes every event after q, but events up to q may
 * come after it (the writer sends the outbox, then the events from its cursor). */
proctype Feed(byte c) {
  byte k, l, b, q, s, lim, r, rel, ret, j;
end:
  do
  :: d_step {                                       /* a frame from the outbox */
       CONNECTED && ob[c].n > 0 ->
       k = ob[c].k[ob[c].head]; l = ob[c].lease[ob[c].head]; b = ob[c].blk[ob[c].head]; q = HEADQ;
       ob[c].k[ob[c].head] = 0; ob[c].lease[ob[c].head] = 0; ob[c].blk[ob[c].head] = 0; ob[c].q[ob[c].head] = 0;
       ob[c].head = (ob[c].head + 1) % OB; ob[c].n--;
       if
       :: k == GRANTED && pendKey[c] == KEY_W ->
#ifndef BUG_EARLY_RECALL
          hd[l].exists = 1;                         /* registered before the next frame is read */
#endif
          repLease[c] = l; repBlk[c] = b; repKind[c] = GRANTED
       :: k == GRANTED && pendKey[c] != KEY_W ->    /* installRegion, releasing a lease it replaces */
          r = 2 * c + pendKey[c];
          if :: reg[r].valid -> reg[r].valid = 0; rel = reg[r].lease :: else -> skip fi;
          reg[r].valid = 1; reg[r].lease = l; reg[r].blk = b; reg[r].since = q; reg[r].changed = 0;
          reg[r].vol = (pendKey[c] == KEY_V -> V : snapHandle[c]);
          repLease[c] = l; repBlk[c] = b; repKind[c] = GRANTED; r = 0
       :: k == DENIED -> repKind[c] = DENIED
       :: k == FENCEDMSG ->                         /* isFenced; the handle says fenced (notify) */
          if :: l != 0 && hd[l].exists -> hd[l].fenced = 1 :: else -> skip fi;
          if :: reg[2*c].valid && reg[2*c].lease == l -> reg[2*c].valid = 0 :: else -> skip fi;
          if :: reg[2*c+1].valid && reg[2*c+1].lease == l -> reg[2*c+1].valid = 0 :: else -> skip fi;
          fencedSeen[c] = 1
       :: k == RECALL ->
          if
          :: hd[l].exists && !hd[l].told && !hd[l].fenced && !hd[l].released ->
             hd[l].told = 1; retPending[c] = l     /* recall(): state recalled, onRecall */
          :: else -> ret = l                        /* given back already: answered at once */
          fi
       fi;
       k = 0; l = 0; b = 0; q = 0;
       tryAck()
     };
     if
     :: rel != 0 -> atomic { toServer[c]!RELEASE,rel,0; rel = 0 }
     :: ret != 0 -> atomic { toServer[c]!RETURN,ret,0; ret = 0 }
     :: else -> skip
     fi
  :: atomic {                                       /* the recall thread: the stores stopped, flushed */
       CONNECTED && retPending[c] != 0 && !(storing[c] && wl[c] == retPending[c]) ->
       toServer[c]!RETURN,retPending[c],0;
#ifdef BUG_FENCE_HIDDEN
       hd[retPending[c]].exists = 0;                /* main: writeLeases[lease] = nil */
#endif
       retPending[c] = 0
     }
  :: d_step {                                       /* the next event */
       READER(c) && CONNECTED && cursor[c] <= seq && (ob[c].n == 0 || HEADQ >= cursor[c]) ->
       s = cursor[c]; cursor[c]++;
       if
       :: evk[s] == EV_REMAP ->
          if :: reg[2*c].valid && s > reg[2*c].since -> reg[2*c].blk = evn[s]; reg[2*c].changed = s :: else -> skip fi
       :: evk[s] == EV_ROLLBACK -> reg[2*c].valid = 0
       :: evk[s] == EV_SNAPD ->
          if :: reg[2*c+1].valid && reg[2*c+1].vol == eva[s] -> reg[2*c+1].valid = 0 :: else -> skip fi
       :: else -> skip
       fi;
       processed[c] = s;
       /* an event every subscriber has read is forgotten */
       if :: cursor[1-c] > s || !READER(1-c) -> evk[s] = 0; eva[s] = 0; evn[s] = 0 :: else -> skip fi;
       tryAck(); s = 0
     }
  od
}

/* ---------------------------------------------------------------- the holder (application) */

/* DAXPool.request: one request in flight per holder; the feed thread files the reply. */
inline request(rkey, rvol) {
  atomic { pendKey[c] = rkey; repKind[c] = 0; toServer[c]!LEASE,rkey,rvol }
}

#define CLEARREPLY repKind[c] = 0; repLease[c] = 0; repBlk[c] = 0

inline openSnap() { snapHandle[c] = snapId }         /* DAXPool.volume(named: "vol@snap") */

inline startLoan(key) { loanOn[c] = 1; loanStart[c] = processed[c]; loanBlk[c] = reg[2*c+key].blk }

/* DAXVolume.withMappedBlock: the region's read lease (asked for if it has none:
 * DAXVolume.region), then the block lent from the region's mapping for the body's duration
 * (between two steps); acknowledgements after the loan's start are held back (borrows). */
inline loan(key) {
  if
  :: d_step { reg[2*c+key].valid -> startLoan(key) }
  :: d_step { !reg[2*c+key].valid -> skip };
     request(key, (key == KEY_V -> V : snapHandle[c]));
     d_step { repKind[c] != 0 -> CLEARREPLY; if :: reg[2*c+key].valid -> startLoan(key) :: else -> skip fi }
  fi;
  if
  :: d_step { loanOn[c] -> loanOn[c] = 0; loanBlk[c] = 0; loanStart[c] = 0; tryAck() }   /* endBorrow */
  :: loanOn[c] && MAYCRASH(c) -> crash()
  :: d_step { !loanOn[c] -> skip }                  /* no lease: read through NBD instead */
  fi;
  skip
}

inline startCopy(key) { copyOn[c] = 1; copyBlk[c] = reg[2*c+key].blk; copyStale[c] = 0 }

/* DAXVolume.readDirect: c1 = the status page; once the events up to c1 are processed, the
 * copy through the region's mapping (between two steps); c2 = the status page; accepted if
 * c2 = c1, or (once the events up to c2 are processed) none of them moved the block. */
inline copy(key) {
  if
  :: d_step { reg[2*c+key].valid -> skip }
  :: d_step { !reg[2*c+key].valid -> skip };
     request(key, V);
     d_step { repKind[c] != 0 -> CLEARREPLY }
  fi;
  c1 = seq;
  d_step { processed[c] >= c1 -> if :: reg[2*c+key].valid -> startCopy(key) :: else -> c1 = 0 fi };
  if
  :: d_step { copyOn[c] -> c2 = seq; copyOn[c] = 0 };   /* the copy is done */
     d_step {
       processed[c] >= c2 ->
       if
       :: c2 == c1 || (reg[2*c+key].valid && reg[2*c+key].changed <= c1) ->
          /* G1: an accepted copy read a block that was not reused meanwhile */
          assert(copyBlk[c] == 0 || !copyStale[c])
       :: else -> skip                              /* retried (not modelled) */
       fi;
       copyBlk[c] = 0; copyStale[c] = 0; c1 = 0; c2 = 0
     }
  :: d_step { !copyOn[c] -> c1 = 0 }
  fi;
  skip
}

/* a second lease over a leased region (DAXVolume.region renewing): installed over the first,
 * whose lease the feed thread releases */
inline renew(key) {
  if
  :: d_step { reg[2*c+key].valid -> skip }; request(key, V); d_step { repKind[c] != 0 -> CLEARREPLY }
  :: d_step { !reg[2*c+key].valid -> skip }
  fi;
  skip
}

#define ENDWRITE n = 0; l = 0; wl[c] = 0; wblk[c] = 0

/* DAXVolume.writeLease, then a store section (DAXWriteLease.withStores) until the holder
 * releases the lease, or was told (onRecall: recalled, fenced) and stops; a slow holder stores
 * after it was told. */
inline writeLease() {
  request(KEY_W, V);
  d_step {
    repKind[c] != 0 ->
    if
    :: repKind[c] == GRANTED ->
       l = repLease[c];
#ifdef BUG_EARLY_RECALL
       hd[l].exists = 1;                            /* main: registered after the reply is read */
#endif
       wl[c] = l; wblk[c] = repBlk[c];
       if :: !hd[l].told && !hd[l].fenced -> storing[c] = 1 :: else -> skip fi
    :: else -> skip
    fi;
    CLEARREPLY
  };
  do
  :: d_step { storing[c] && n < MAXST ->
       n++;
       /* G5, G7: a store lands in the volume's own block under a lease the server honours, or,
        * once fenced, in that block (until it is moved away) or in the orphan pinned for this
        * holder: never in a block that is free, reused, or shared with a snapshot */
       assert((vmap == wblk[c] && RC(wblk[c]) == 1 && (L[l].st == LS_ACTIVE || sb[c].fpin[wblk[c]])) ||
              (RC(wblk[c]) == 0 && sb[c].fpin[wblk[c]] && !reserved[wblk[c]]))
     }
  :: d_step { storing[c] && (hd[l].told || hd[l].fenced) -> storing[c] = 0; ENDWRITE }; break
  :: atomic { storing[c] && !hd[l].told && !hd[l].fenced ->
       storing[c] = 0; hd[l].released = 1; toServer[c]!RELEASE,l,0; ENDWRITE }; break
  :: storing[c] && MAYCRASH(c) -> crash(); d_step { ENDWRITE }; break
  :: d_step { !storing[c] -> ENDWRITE }; break
  od;
  skip
}

/* The process dies (no more loads or stores through its mapping); a new one connects. */
inline crash() {
  atomic {
    storing[c] = 0; wl[c] = 0; wblk[c] = 0; loanOn[c] = 0; loanBlk[c] = 0; loanStart[c] = 0; copyOn[c] = 0;
    reg[2*c].valid = 0; reg[2*c+1].valid = 0; repKind[c] = 0; pendKey[c] = 0; snapHandle[c] = 0;
    retPending[c] = 0; loanLost[c] = 0; fencedSeen[c] = 0;
    cinc[c]++;
    toServer[c]!BYE,0,0
  };
  toServer[c]!HELLO,0,0;
  (alive[c] && sinc[c] == cinc[c])
}

proctype Holder0() { byte c = 0; byte l, n, c1, c2, lim, j; H0_SCRIPT }
proctype Holder1() { byte c = 1; byte l, n, c1, c2, lim, j; H1_SCRIPT }

/* ---------------------------------------------------------------- the final check */

active proctype Monitor() {
  byte l, c;
  timeout ->
  d_step {
    for (l : 1 .. NL) {
      if
      :: L[l].mode == WR && L[l].st != LS_NONE && L[l].inc == cinc[L[l].cli] ->
         /* G6, G7: a fenced holder sees it on its handle, only after its block left the volume;
          * a lease still held has a handle */
         assert(L[l].st != LS_FDONE || hd[l].fenced);
         assert(L[l].st != LS_FENCED);              /* its block was moved away in the end */
         assert(L[l].st != LS_ACTIVE || hd[l].exists)
      :: else -> skip
      fi
    };
    for (c : 0 .. NC-1) {
      /* G7: a session whose lent block was reused (only possible once fenced) was told */
      assert(!loanLost[c] || fencedSeen[c])
    }
  }
}

init {
  atomic {
    vmap = INIT_V;
#if INIT_S
    smap = INIT_S; snapId = nextSnap; nextSnap++;
#endif
    alive[0] = 1; alive[1] = 1; cursor[0] = 1; cursor[1] = 1;
    run Writer(); run SnapOps(); run Deleter();
#if ACKFENCE
    run Reaper();
#endif
    run Session(0); run Session(1); run Worker(0); run Worker(1); run Feed(0); run Feed(1);
    run Holder0(); run Holder1()
  }
}
