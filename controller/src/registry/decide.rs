//! Decisions about one instance record, as pure functions: the record as read (or its
//! absence) and the request in, the new record to store and the audit event to append
//! (or a refusal) out. No store, no clock but the `now` given, no I/O:
//! [`super::Registry::update_instance`] reads the record, calls the decision, stores its
//! record by compare-and-swap on the revision read (calling the decision again on a
//! conflict), then appends its audit event.

use asmn_shared::chain::RevealError;
use asmn_shared::dh::Group;
use asmn_shared::wire::Enroll;
use asmn_shared::wire::msg::RefusalCode;

use asmn_shared::catalog::AttestationMode;
use asmn_shared::chain::RenewalError;

use super::{
    ChainRecord, InstanceRecord, InstanceState, Reattestation, Reattested, Refusal, RegistryError,
};

/// An audit record to append: its kind and detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Audit {
    /// Such as `instance.revoked`.
    pub kind: &'static str,
    /// For a human.
    pub detail: String,
}

impl Audit {
    fn new(kind: &'static str, detail: impl Into<String>) -> Option<Audit> {
        Some(Audit {
            kind,
            detail: detail.into(),
        })
    }
}

/// What a decision makes of an instance record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision<T> {
    /// Store `record` (if the record is still the one read), then audit, then answer.
    Store {
        record: Box<InstanceRecord>,
        audit: Option<Audit>,
        answer: T,
    },
    /// Store nothing; audit (if any) and answer.
    Keep { audit: Option<Audit>, answer: T },
    /// Refuse: audit the refusal (within the per-instance budget of refusal records),
    /// quarantine or revoke the instance when `then` says so, and answer `refusal`.
    Refuse {
        refusal: Refusal,
        audit: Option<Audit>,
        then: Option<Then>,
    },
}

fn refusal(code: RefusalCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// A reveal the chain refused: the refusal, its audit record (`kind` is
/// `reveal.refused` at enrollment, `reattest.refused` later), and whether the instance is
/// quarantined. A wrong image or nonce at enrollment is a fake VNF: quarantined, so no
/// peer ever learns it. An enrolled instance is not quarantined by a bad reveal: its ID
/// is known to its peers, and one of them could otherwise cut it off.
pub(crate) fn reveal_refused<T>(
    state: &InstanceState,
    e: &RevealError,
    kind: &'static str,
) -> Decision<T> {
    let code = match e {
        RevealError::Mismatch { .. } | RevealError::SeedRevealed => RefusalCode::WrongMeasurement,
        RevealError::Replayed { .. } => RefusalCode::Replayed,
        RevealError::SkipTooFar { .. } => RefusalCode::SkipTooFar,
        RevealError::WrongEpoch { .. } => RefusalCode::WrongEpoch,
    };
    let fake = code == RefusalCode::WrongMeasurement && *state == InstanceState::Created;
    Decision::Refuse {
        refusal: refusal(code, e.to_string()),
        audit: if fake {
            Audit::new("enroll.refused", format!("wrong measurement: {e}"))
        } else {
            Audit::new(kind, e.to_string())
        },
        then: fake.then(|| Then::Quarantine(e.to_string())),
    }
}

/// Phase 1's first reveal: the instance's names and role must be the record's, it must
/// be neither revoked nor quarantined, use the tenant's D-H group, and its reveal must
/// extend the chain. Accepted, the record is enrolled with the agent's keys and
/// endpoint, and is the answer.
pub(crate) fn enroll(
    rec: Option<InstanceRecord>,
    req: &Enroll,
    group: Group,
    now: u64,
) -> Result<Decision<InstanceRecord>, RegistryError> {
    // Nothing known to audit: anyone can send this (a random ID) as often as they like.
    // It is counted in the metrics and logged at a bounded rate.
    let mut rec = rec.ok_or_else(|| {
        RegistryError::Refused(refusal(
            RefusalCode::UnknownInstance,
            "no such instance: it was never created, or its bundle is wrong",
        ))
    })?;
    let refused = |code, message: String, detail: String| Decision::Refuse {
        refusal: refusal(code, message),
        audit: Audit::new("enroll.refused", detail),
        then: None,
    };
    // The role too: it decides what a connection is pushed (a gateway gets the catalogs
    // of the VNFs behind it) and what it may ask.
    if rec.tenant != req.tenant
        || rec.vnf != req.vnf
        || rec.instance != req.instance
        || rec.role != req.role
    {
        return Ok(refused(
            RefusalCode::UnknownInstance,
            "the names do not match the instance".into(),
            "identity mismatch".into(),
        ));
    }
    match &rec.state {
        InstanceState::Revoked(r) => {
            return Ok(refused(
                RefusalCode::Revoked,
                format!("instance revoked: {r}"),
                format!("revoked: {r}"),
            ));
        }
        InstanceState::Quarantined(r) => {
            return Ok(refused(
                RefusalCode::Quarantined,
                format!("instance quarantined: {r}"),
                format!("quarantined: {r}"),
            ));
        }
        InstanceState::Created | InstanceState::Enrolled => {}
    }
    if req.dh_group != group {
        return Err(RegistryError::Refused(refusal(
            RefusalCode::InvalidRequest,
            format!("the tenant uses {group}"),
        )));
    }
    let verified = match rec.verifier()?.verify(&req.reveal) {
        Ok(v) => v,
        Err(e) => return Ok(reveal_refused(&rec.state, &e, "reveal.refused")),
    };
    rec.chain.last_index = verified.index;
    rec.chain.last_element = verified.element;
    rec.state = InstanceState::Enrolled;
    rec.wg_public_key = Some(req.wg_public_key);
    rec.dh_public = Some(req.dh_public.as_bytes().to_vec());
    rec.endpoint = Some(req.endpoint);
    rec.last_attestation = Some(now);
    Ok(Decision::Store {
        record: Box::new(rec.clone()),
        audit: Audit::new(
            "enroll.accepted",
            format!("element {} accepted", verified.index),
        ),
        answer: rec,
    })
}

/// Checks a D-H public value for the tenant's group; its bytes when it is valid.
pub(crate) type ValidDh<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, RegistryError> + 'a;

/// What follows a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// Quarantine the instance, for this reason.
    Quarantine(String),
    /// Revoke the instance, for this reason.
    Revoke(String),
}

/// What re-attestation holds against: the VNF's golden SHA-256 and mode.
pub(crate) struct Golden<'a> {
    pub sha256: &'a [u8; 32],
    pub mode: AttestationMode,
}

/// A reveal after enrollment (re-attestation): the instance must be enrolled and its
/// element extend the chain. In strict mode the fresh measurement must equal the golden
/// SHA-256, and a changed target revokes the instance; in continuity mode a changed
/// target must come with a renewal (a new epoch). A renewal (either mode, also before a
/// chain runs out) opens the sealed anchor of the next chain and installs its D-H public
/// value (validated by `valid_dh`).
pub(crate) fn reattest(
    rec: Option<InstanceRecord>,
    req: &Reattestation<'_>,
    golden: &Golden<'_>,
    valid_dh: &ValidDh<'_>,
    now: u64,
) -> Result<Decision<Reattested>, RegistryError> {
    let mut rec = enrolled(rec).map_err(RegistryError::Refused)?;
    let fresh: [u8; 32] = req.measurement.try_into().map_err(|_| {
        RegistryError::Refused(refusal(
            RefusalCode::InvalidRequest,
            "reattest.measurement must be a 32-byte SHA-256 digest",
        ))
    })?;
    let changed = fresh != rec.measurement.unwrap_or(*golden.sha256);
    match golden.mode {
        AttestationMode::Strict if fresh != *golden.sha256 => {
            return Ok(Decision::Refuse {
                refusal: refusal(
                    RefusalCode::Revoked,
                    "the image no longer matches its golden measurement",
                ),
                audit: None,
                then: Some(Then::Revoke(
                    "re-attestation: the measured image changed".into(),
                )),
            });
        }
        AttestationMode::Continuity if changed && req.renewal.is_none() => {
            return Ok(Decision::Refuse {
                refusal: refusal(
                    RefusalCode::BadRenewal,
                    "continuity mode: a changed target starts a new epoch; send the renewal \
                     with this reveal",
                ),
                audit: Audit::new(
                    "reattest.refused",
                    "continuity mode: target changed without a renewal",
                ),
                then: None,
            });
        }
        _ => {}
    }
    let verifier = rec.verifier()?;
    let (kind, what) = match req.renewal {
        Some((sealed, dh)) => {
            let dh = valid_dh(dh)?;
            let next = match verifier.verify_renewal(req.reveal, sealed) {
                Ok(v) => v,
                Err(RenewalError::Reveal(e)) => {
                    return Ok(reveal_refused(&rec.state, &e, "reattest.refused"));
                }
                Err(e) => {
                    return Ok(Decision::Refuse {
                        refusal: refusal(RefusalCode::BadRenewal, e.to_string()),
                        audit: Audit::new("renewal.refused", e.to_string()),
                        then: None,
                    });
                }
            };
            rec.chain = ChainRecord {
                epoch: next.spec.epoch,
                length: next.spec.length,
                last_index: next.last_index,
                last_element: next.last_element,
                window: next.window,
            };
            rec.dh_public = Some(dh);
            (
                "chain.renewed",
                format!(
                    "element {} accepted; epoch {} of {} elements begins ({} mode{})",
                    req.reveal.index,
                    next.spec.epoch,
                    next.spec.length,
                    golden.mode,
                    if changed { ", target changed" } else { "" }
                ),
            )
        }
        None => {
            let verified = match verifier.verify(req.reveal) {
                Ok(v) => v,
                Err(e) => return Ok(reveal_refused(&rec.state, &e, "reattest.refused")),
            };
            rec.chain.last_index = verified.index;
            rec.chain.last_element = verified.element;
            (
                "reattest.accepted",
                format!("element {} accepted", verified.index),
            )
        }
    };
    rec.measurement = Some(fresh);
    rec.last_attestation = Some(now);
    let answer = Reattested {
        epoch: rec.chain.epoch,
        last_index: rec.chain.last_index,
    };
    Ok(Decision::Store {
        record: Box::new(rec),
        audit: Audit::new(kind, what),
        answer,
    })
}

/// Revokes the instance: it cannot enroll again with this identity.
pub(crate) fn revoke(rec: Option<InstanceRecord>, reason: &str) -> Result<Decision<()>, Refusal> {
    let mut rec = rec.ok_or_else(|| refusal(RefusalCode::UnknownInstance, "no such instance"))?;
    rec.state = InstanceState::Revoked(reason.to_string());
    Ok(Decision::Store {
        record: Box::new(rec),
        audit: Audit::new("instance.revoked", reason),
        answer: (),
    })
}

/// Quarantines the instance (a fake VNF refused at enrollment) if it is still only
/// created; one already quarantined or revoked stays as it is (the event is recorded
/// again); an unknown one, or one enrolled meanwhile (its genuine agent won the race
/// against a forged first reveal on another replica), is left alone.
pub(crate) fn quarantine(rec: Option<InstanceRecord>, reason: &str) -> Decision<()> {
    match rec {
        None => Decision::Keep {
            audit: None,
            answer: (),
        },
        Some(r) if r.state == InstanceState::Enrolled => Decision::Keep {
            audit: None,
            answer: (),
        },
        Some(r)
            if matches!(
                r.state,
                InstanceState::Quarantined(_) | InstanceState::Revoked(_)
            ) =>
        {
            Decision::Keep {
                audit: Audit::new("instance.quarantined", reason),
                answer: (),
            }
        }
        Some(mut r) => {
            r.state = InstanceState::Quarantined(reason.to_string());
            Decision::Store {
                record: Box::new(r),
                audit: Audit::new("instance.quarantined", reason),
                answer: (),
            }
        }
    }
}

/// The record of an enrolled instance, or the refusal a request about another gets.
pub(crate) fn enrolled(rec: Option<InstanceRecord>) -> Result<InstanceRecord, Refusal> {
    let rec = rec.ok_or_else(|| refusal(RefusalCode::UnknownInstance, "no such instance"))?;
    if rec.state != InstanceState::Enrolled {
        return Err(refusal(
            RefusalCode::Revoked,
            format!("instance is not enrolled ({:?})", rec.state),
        ));
    }
    Ok(rec)
}

/// Replaces an enrolled agent's published keys for its current chain epoch (the D-H
/// value validated by the caller).
pub(crate) fn publish_keys(
    rec: Option<InstanceRecord>,
    wg_public_key: &[u8; 32],
    dh_public: &[u8],
    epoch: u32,
) -> Result<Decision<()>, Refusal> {
    let mut rec = enrolled(rec)?;
    if epoch != rec.chain.epoch {
        return Err(refusal(
            RefusalCode::WrongEpoch,
            format!(
                "keys for epoch {epoch}, but the chain is in epoch {}",
                rec.chain.epoch
            ),
        ));
    }
    rec.wg_public_key = Some(*wg_public_key);
    rec.dh_public = Some(dh_public.to_vec());
    Ok(Decision::Store {
        record: Box::new(rec),
        audit: Audit::new("keys.published", format!("epoch {epoch}")),
        answer: (),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ChainRecord;
    use asmn_shared::ids::Role;

    fn record(state: InstanceState) -> InstanceRecord {
        InstanceRecord {
            id: asmn_shared::ids::InstanceKey::from_bytes([0; 32]),
            tenant: "t1".parse().expect("tenant"),
            vnf: "web".parse().expect("vnf"),
            instance: "web-0".parse().expect("name"),
            role: Role::Vnf,
            overlay: "10.77.0.2/16".parse().expect("overlay"),
            state,
            chain: ChainRecord {
                epoch: 1,
                length: 100,
                last_index: 90,
                last_element: [0x11; 32],
                window: 8,
            },
            wg_public_key: None,
            dh_public: None,
            endpoint: None,
            last_attestation: None,
            enforced_catalog: None,
            catalog_latency_ms: None,
            measurement: None,
        }
    }

    fn code<T: std::fmt::Debug>(r: Result<T, Refusal>) -> RefusalCode {
        r.expect_err("refused").code
    }

    /// A created instance's record and its agent's genuine first enrollment, and the
    /// agent's prover (for later reveals).
    fn fresh() -> (InstanceRecord, Enroll, asmn_shared::chain::ChainProver) {
        use asmn_shared::chain::{self, ChainProver, ChainSpec, DEFAULT_WINDOW};
        use asmn_shared::ids::InstanceKey;
        use asmn_shared::measure::{Algorithm, measure_bytes};
        let (tenant, vnf, name) = (
            "t1".parse().expect("t"),
            "web".parse().expect("v"),
            "web-0".parse().expect("i"),
        );
        let nonce = asmn_shared::crypto::Nonce::new([3; 32]);
        let id = InstanceKey::derive(&tenant, &vnf, &name, &nonce);
        let golden = measure_bytes(b"image", &[Algorithm::Sha256]).expect("m");
        let golden = &golden.get(Algorithm::Sha256).expect("sha").0;
        let spec = ChainSpec::new(id, 0, 100).expect("spec");
        let seed = chain::seed(&nonce, &id, golden, 0);
        let mut rec = record(InstanceState::Created);
        rec.id = id;
        rec.chain = ChainRecord {
            epoch: 0,
            length: 100,
            last_index: 100,
            last_element: chain::anchor(&spec, &seed),
            window: DEFAULT_WINDOW,
        };
        let dh = asmn_shared::dh::DhKeyPair::derive(Group::Ffdhe3072, &seed, &id, 0);
        let mut prover = ChainProver::new(spec, seed);
        let req = Enroll {
            id,
            tenant,
            vnf,
            instance: name,
            reveal: prover.reveal().expect("reveal"),
            wg_public_key: [1; 32],
            dh_group: Group::Ffdhe3072,
            dh_public: dh.public().clone(),
            endpoint: "192.0.2.5:51820".parse().expect("endpoint"),
            role: Role::Vnf,
        };
        (rec, req, prover)
    }

    fn refused<T: std::fmt::Debug>(
        d: Result<Decision<T>, RegistryError>,
    ) -> (RefusalCode, Option<&'static str>, bool) {
        match d {
            Err(RegistryError::Refused(r)) => (r.code, None, false),
            Ok(Decision::Refuse {
                refusal,
                audit,
                then,
            }) => (refusal.code, audit.map(|a| a.kind), then.is_some()),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn enrollment_refuses_each_way_it_can_be_wrong() {
        let g = Group::Ffdhe3072;
        let (rec, req, _) = fresh();
        // Unknown: refused without a record of it (anyone can send random IDs).
        assert_eq!(
            refused(enroll(None, &req, g, 10)),
            (RefusalCode::UnknownInstance, None, false)
        );
        // Names or role not the record's.
        let mut other = req.clone();
        other.role = Role::Gateway;
        assert_eq!(
            refused(enroll(Some(rec.clone()), &other, g, 10)),
            (RefusalCode::UnknownInstance, Some("enroll.refused"), false)
        );
        // Revoked, quarantined.
        let mut r = rec.clone();
        r.state = InstanceState::Revoked("x".into());
        assert_eq!(
            refused(enroll(Some(r), &req, g, 10)),
            (RefusalCode::Revoked, Some("enroll.refused"), false)
        );
        let mut r = rec.clone();
        r.state = InstanceState::Quarantined("x".into());
        assert_eq!(
            refused(enroll(Some(r), &req, g, 10)),
            (RefusalCode::Quarantined, Some("enroll.refused"), false)
        );
        // Another D-H group than the tenant's.
        assert_eq!(
            refused(enroll(Some(rec.clone()), &req, Group::Ffdhe4096, 10)),
            (RefusalCode::InvalidRequest, None, false)
        );
        // A reveal of another chain (a wrong image or nonce): a fake, quarantined.
        let mut fake = req.clone();
        fake.reveal.element = asmn_shared::crypto::ChainElement::new([9; 32]);
        assert_eq!(
            refused(enroll(Some(rec.clone()), &fake, g, 10)),
            (RefusalCode::WrongMeasurement, Some("enroll.refused"), true)
        );
        // Genuine: enrolled, with its keys and endpoint.
        let Ok(Decision::Store { record, audit, .. }) = enroll(Some(rec.clone()), &req, g, 10)
        else {
            panic!("accepted")
        };
        assert_eq!(record.state, InstanceState::Enrolled);
        assert_eq!(record.chain.last_index, req.reveal.index);
        assert_eq!(record.last_attestation, Some(10));
        assert_eq!(audit.map(|a| a.kind), Some("enroll.accepted"));
        // The same reveal again: a replay (not quarantined: the instance is enrolled).
        assert_eq!(
            refused(enroll(Some(*record.clone()), &req, g, 11)),
            (RefusalCode::Replayed, Some("reveal.refused"), false)
        );
        // An enrolled instance's wrong next reveal is refused, never quarantined.
        let mut wrong_next = fake.clone();
        wrong_next.reveal.index = record.chain.last_index - 1;
        assert_eq!(
            refused(enroll(Some(*record), &wrong_next, g, 11)),
            (RefusalCode::WrongMeasurement, Some("reveal.refused"), false)
        );
    }

    #[test]
    fn reattestation_refuses_each_way_it_can_be_wrong() {
        use asmn_shared::measure::{Algorithm, measure_bytes};
        let g = Group::Ffdhe3072;
        let (rec, req, mut prover) = fresh();
        let Ok(Decision::Store { record, .. }) = enroll(Some(rec.clone()), &req, g, 10) else {
            panic!("enrolled")
        };
        let enrolled_rec = *record;
        let golden = measure_bytes(b"image", &[Algorithm::Sha256]).expect("m");
        let golden = golden.get(Algorithm::Sha256).expect("sha").0.clone();
        let sha: [u8; 32] = golden.as_slice().try_into().expect("32 bytes");
        let next = prover.reveal().expect("next");
        let strict = Golden {
            sha256: &sha,
            mode: AttestationMode::Strict,
        };
        let continuity = Golden {
            sha256: &sha,
            mode: AttestationMode::Continuity,
        };
        let good = Reattestation {
            reveal: &next,
            measurement: &golden,
            renewal: None,
        };
        let changed = [0u8; 32];
        let tampered = Reattestation {
            reveal: &next,
            measurement: &changed,
            renewal: None,
        };
        let no_dh = |_: &[u8]| -> Result<Vec<u8>, RegistryError> { Ok(vec![0xaa]) };
        let rr = |rec: Option<InstanceRecord>, r: &Reattestation<'_>, gold: &Golden<'_>| {
            refused(reattest(rec, r, gold, &no_dh, 20))
        };
        assert_eq!(
            rr(None, &good, &strict),
            (RefusalCode::UnknownInstance, None, false)
        );
        assert_eq!(
            rr(Some(rec.clone()), &good, &strict),
            (RefusalCode::Revoked, None, false)
        );
        // Strict: a changed image revokes the instance.
        let Ok(Decision::Refuse { refusal, then, .. }) =
            reattest(Some(enrolled_rec.clone()), &tampered, &strict, &no_dh, 20)
        else {
            panic!("refused")
        };
        assert_eq!(refusal.code, RefusalCode::Revoked);
        assert!(matches!(then, Some(Then::Revoke(_))));
        // Continuity: a changed image needs a renewal.
        assert_eq!(
            rr(Some(enrolled_rec.clone()), &tampered, &continuity),
            (RefusalCode::BadRenewal, Some("reattest.refused"), false)
        );
        // The enrollment's reveal again: a replay.
        let replay = Reattestation {
            reveal: &req.reveal,
            measurement: &golden,
            renewal: None,
        };
        assert_eq!(
            rr(Some(enrolled_rec.clone()), &replay, &strict),
            (RefusalCode::Replayed, Some("reattest.refused"), false)
        );
        // A reveal further down than the skip window allows.
        let far = asmn_shared::chain::Reveal {
            index: next.index - enrolled_rec.chain.window - 2,
            ..next.clone()
        };
        let skipping = Reattestation {
            reveal: &far,
            measurement: &golden,
            renewal: None,
        };
        assert_eq!(
            rr(Some(enrolled_rec.clone()), &skipping, &strict),
            (RefusalCode::SkipTooFar, Some("reattest.refused"), false)
        );
        // A measurement that is not a SHA-256 digest.
        let short = Reattestation {
            reveal: &next,
            measurement: &golden[..31],
            renewal: None,
        };
        assert_eq!(
            rr(Some(enrolled_rec.clone()), &short, &strict),
            (RefusalCode::InvalidRequest, None, false)
        );
        // A renewal whose sealed anchor does not open under the revealed element.
        let forged = asmn_shared::chain::SealedRenewal {
            new_epoch: enrolled_rec.chain.epoch + 1,
            new_length: 100,
            ciphertext: vec![0; 48],
        };
        let bad_renewal = Reattestation {
            reveal: &next,
            measurement: &golden,
            renewal: Some((&forged, &[0xaa])),
        };
        assert_eq!(
            rr(Some(enrolled_rec.clone()), &bad_renewal, &strict),
            (RefusalCode::BadRenewal, Some("renewal.refused"), false)
        );
        // The next element: accepted.
        let Ok(Decision::Store {
            record,
            audit,
            answer,
        }) = reattest(Some(enrolled_rec), &good, &strict, &no_dh, 20)
        else {
            panic!("accepted")
        };
        assert_eq!(answer.last_index, next.index);
        assert_eq!(record.last_attestation, Some(20));
        assert_eq!(record.measurement, Some(sha));
        assert_eq!(audit.map(|a| a.kind), Some("reattest.accepted"));
    }

    #[test]
    fn revoking_needs_an_instance_and_records_the_reason() {
        assert_eq!(code(revoke(None, "x")), RefusalCode::UnknownInstance);
        let Ok(Decision::Store { record, audit, .. }) =
            revoke(Some(record(InstanceState::Enrolled)), "scaled in")
        else {
            panic!("a revocation stores the record")
        };
        assert_eq!(record.state, InstanceState::Revoked("scaled in".into()));
        assert_eq!(audit.map(|a| a.kind), Some("instance.revoked"));
    }

    #[test]
    fn quarantine_changes_only_a_created_instance() {
        // Enrolled meanwhile (the genuine agent won the race): left alone.
        assert_eq!(
            quarantine(Some(record(InstanceState::Enrolled)), "fake"),
            Decision::Keep {
                audit: None,
                answer: ()
            }
        );
        assert_eq!(
            quarantine(None, "fake"),
            Decision::Keep {
                audit: None,
                answer: ()
            }
        );
        for settled in [
            InstanceState::Quarantined("before".into()),
            InstanceState::Revoked("before".into()),
        ] {
            assert!(matches!(
                quarantine(Some(record(settled)), "fake"),
                Decision::Keep { audit: Some(_), .. }
            ));
        }
        let Decision::Store { record, .. } =
            quarantine(Some(record(InstanceState::Created)), "fake")
        else {
            panic!("stored")
        };
        assert_eq!(record.state, InstanceState::Quarantined("fake".into()));
    }

    #[test]
    fn keys_are_published_by_an_enrolled_instance_for_its_epoch() {
        let key = [7u8; 32];
        assert_eq!(
            code(publish_keys(None, &key, &[0xaa], 1)),
            RefusalCode::UnknownInstance
        );
        for state in [
            InstanceState::Created,
            InstanceState::Quarantined("q".into()),
            InstanceState::Revoked("r".into()),
        ] {
            assert_eq!(
                code(publish_keys(Some(record(state)), &key, &[0xaa], 1)),
                RefusalCode::Revoked
            );
        }
        assert_eq!(
            code(publish_keys(
                Some(record(InstanceState::Enrolled)),
                &key,
                &[0xaa],
                2
            )),
            RefusalCode::WrongEpoch
        );
        let Ok(Decision::Store { record, audit, .. }) =
            publish_keys(Some(record(InstanceState::Enrolled)), &key, &[0xaa], 1)
        else {
            panic!("stored")
        };
        assert_eq!(record.wg_public_key, Some(key));
        assert_eq!(record.dh_public.as_deref(), Some(&[0xaa][..]));
        assert_eq!(audit.map(|a| a.kind), Some("keys.published"));
    }
}
