//! No secret byte ever appears in `Debug` (or `Display`, where a type has one) output:
//! not as lower- or upper-case hex, not as base64, not as a Rust byte-array listing.

use asmn_shared::chain::{ChainProver, ChainSpec, seed};
use asmn_shared::crypto::{AeadKey, ChainElement, Nonce, PresharedKey, SecretBytes, SecretVec};
use asmn_shared::dh::{DhKeyPair, Group};
use asmn_shared::ids::{InstanceKey, InstanceName, Role, TenantId, VnfId};
use asmn_shared::wire::{BootstrapBundle, msg};
use base64::Engine;

/// Distinctive secret bytes (no long runs that could occur by chance).
fn secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(0x5b);
    }
    s
}

fn forbidden_forms(bytes: &[u8]) -> Vec<String> {
    let mut forms = vec![
        hex::encode(bytes),
        hex::encode_upper(bytes),
        base64::engine::general_purpose::STANDARD.encode(bytes),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        format!("{:?}", &bytes[..8])
            .trim_end_matches(']')
            .to_string(),
    ];
    // Any 8-byte window in hex, in case a type prints a prefix or a slice.
    for w in bytes.windows(8).step_by(4) {
        forms.push(hex::encode(w));
    }
    forms
}

fn assert_clean(what: &str, text: &str, secret: &[u8]) {
    for form in forbidden_forms(secret) {
        assert!(
            !text.contains(&form),
            "{what} leaks the secret as {form:?} in {text:?}"
        );
    }
}

#[test]
fn secret_types_print_no_secret() {
    let s = secret();
    assert_clean("SecretBytes", &format!("{:?}", SecretBytes::new(s)), &s);
    assert_clean(
        "SecretVec",
        &format!("{:?}", SecretVec::new(s.to_vec())),
        &s,
    );
    assert_clean("Nonce", &format!("{:?}", Nonce::new(s)), &s);
    assert_clean("ChainElement", &format!("{:?}", ChainElement::new(s)), &s);
    assert_clean("PresharedKey", &format!("{:?}", PresharedKey::new(s)), &s);
    assert_clean("AeadKey", &format!("{:?}", AeadKey::new(s)), &s);
    assert_clean("{:#?} Nonce", &format!("{:#?}", Nonce::new(s)), &s);
}

#[test]
fn structures_holding_secrets_print_no_secret() {
    let s = secret();
    let tenant = TenantId::new("t").expect("t");
    let vnf = VnfId::new("v").expect("v");
    let instance = InstanceName::new("i").expect("i");
    let nonce = Nonce::new(s);
    let id = InstanceKey::derive(&tenant, &vnf, &instance, &nonce);

    // The chain's seed and every element the prover holds.
    let spec = ChainSpec::new(id, 0, 64).expect("spec");
    let sd = seed(&nonce, &id, b"digest", 0);
    let seed_bytes = *sd.expose();
    let mut prover = ChainProver::new(spec, sd.clone());
    let text = format!("{prover:?} {prover:#?}");
    assert_clean("ChainProver (seed)", &text, &seed_bytes);
    let reveal = prover.reveal().expect("reveal");
    let next = prover.reveal().expect("next");
    let text = format!("{prover:?}");
    assert_clean("ChainProver (unrevealed)", &text, next.element.expose());
    assert_clean("Reveal", &format!("{reveal:?}"), reveal.element.expose());
    let rm: msg::RevealMsg = (&reveal).into();
    assert_clean("RevealMsg", &format!("{rm:?}"), reveal.element.expose());

    // The D-H exponent: derived from the seed; check the pair prints neither the seed nor
    // the shared value.
    let kp = DhKeyPair::derive(Group::Ffdhe3072, &sd, &id, 0);
    let other = DhKeyPair::derive(Group::Ffdhe3072, &ChainElement::new([1; 32]), &id, 1);
    let shared = kp.shared_secret(other.public()).expect("shared");
    let text = format!("{kp:?} {shared:?}");
    assert_clean("DhKeyPair", &text, &seed_bytes);
    assert_clean("shared value", &text, &shared.expose()[..32]);
    let psk = kp
        .preshared_key((&id, 0), (&id, 1), other.public())
        .expect("psk");
    assert_clean("PresharedKey", &format!("{psk:?}"), psk.expose());

    // The bootstrap bundle carries the nonce, in domain and wire form.
    let bundle = BootstrapBundle {
        controllers: vec!["127.0.0.1:7443".into()],
        server_name: "sec-em".into(),
        ca_pem: "pem".into(),
        tenant,
        vnf,
        instance,
        nonce: Nonce::new(s),
        chain_length: 100,
        role: Role::Vnf,
        dh_group: Group::Ffdhe3072,
    };
    assert_clean("BootstrapBundle", &format!("{bundle:?} {bundle:#?}"), &s);
    let wire: msg::BootstrapBundleMsg = (&bundle).into();
    assert_clean("BootstrapBundleMsg", &format!("{wire:?} {wire:#?}"), &s);
    let env = msg::Envelope {
        request_id: 1,
        body: Some(msg::Body::InstanceCreated(wire)),
    };
    assert_clean("Envelope", &format!("{env:?}"), &s);
}

#[test]
fn secrets_compare_in_constant_time_and_correctly() {
    let a = PresharedKey::new([1; 32]);
    let b = PresharedKey::new([1; 32]);
    let mut c_bytes = [1; 32];
    c_bytes[31] = 2;
    let c = PresharedKey::new(c_bytes);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(SecretVec::new(vec![1, 2]).ct_eq(&SecretVec::new(vec![1, 2])));
    assert!(!SecretVec::new(vec![1, 2]).ct_eq(&SecretVec::new(vec![1, 3])));
}
