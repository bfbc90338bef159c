//! Key files, the key ring, and signing and verifying tags with it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _,
    KeypairBytes,
};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::tag::{decode_payload, split};
use super::{is_valid_key_id, Algorithm, TagClaims, TagError, MAX_TAG_LEN, TAG_PREFIX};

/// Key files are a few hundred bytes; a much larger file is a mistake, not a key.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// Shortest HMAC secret accepted: the output size of SHA-256.
const MIN_HMAC_KEY: usize = 32;

/// Standard base64 that also accepts missing padding (hand-written key files often lack it).
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A key file that could not be used (or written), and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct KeyError {
    /// The file (or directory) concerned.
    pub file: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl KeyError {
    fn new(file: &Path, message: impl Into<String>) -> Self {
        KeyError {
            file: file.to_path_buf(),
            message: message.into(),
        }
    }
}

/// One key of the ring.
#[derive(Clone)]
pub(super) enum Key {
    /// An Ed25519 key; `signing` is absent when only the public key was given.
    Ed25519 {
        verifying: VerifyingKey,
        // Boxed: an expanded signing key is large, and most rings also hold public keys.
        signing: Option<Box<SigningKey>>,
    },
    /// An HMAC-SHA256 key, kept as the keyed state so that each tag skips the key schedule.
    Hmac(Hmac<Sha256>),
}

impl Key {
    fn algorithm(&self) -> Algorithm {
        match self {
            Key::Ed25519 { .. } => Algorithm::Ed25519,
            Key::Hmac(_) => Algorithm::HmacSha256,
        }
    }

    fn can_sign(&self) -> bool {
        match self {
            Key::Ed25519 { signing, .. } => signing.is_some(),
            Key::Hmac(_) => true,
        }
    }

    /// Signs `message` and appends the base64url signature to `out`; false if verify-only.
    pub(super) fn sign_into(&self, message: &[u8], out: &mut String) -> bool {
        match self {
            Key::Ed25519 {
                signing: Some(signing),
                ..
            } => {
                let signature = signing.sign(message).to_bytes();
                URL_SAFE_NO_PAD.encode_string(signature, out);
                true
            }
            Key::Ed25519 { signing: None, .. } => false,
            Key::Hmac(mac) => {
                let mut mac = mac.clone();
                mac.update(message);
                URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), out);
                true
            }
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Key::Ed25519 { verifying, .. } => Signature::from_slice(signature)
                // Strict: rejects non-canonical signatures and weak keys, so no second valid
                // signature can be made for a tag.
                .is_ok_and(|s| verifying.verify_strict(message, &s).is_ok()),
            Key::Hmac(mac) => {
                let mut mac = mac.clone();
                mac.update(message);
                // Constant time, so a forger learns nothing from timing.
                mac.verify_slice(signature).is_ok()
            }
        }
    }
}

// By hand, so that no secret can reach a log through `{:?}`.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("algorithm", &self.algorithm())
            .field("can_sign", &self.can_sign())
            .finish_non_exhaustive()
    }
}

/// Keys by id. Immutable; rebuilt at every reload.
///
/// Cloning is cheap (the keys are shared); hold it in an `Arc` or swap it with the policy.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: Arc<BTreeMap<String, Key>>,
}

/// What the files of one key id hold, while loading.
#[derive(Default)]
struct Found {
    private: Option<(PathBuf, SigningKey)>,
    public: Option<(PathBuf, VerifyingKey)>,
    hmac: Option<(PathBuf, Hmac<Sha256>)>,
}

#[derive(Clone, Copy)]
enum Kind {
    Private,
    Public,
    Hmac,
}

impl KeyRing {
    /// Loads every key file in `dir` (see the module docs for names and formats).
    ///
    /// Every bad file is reported, each error naming its file; files of other names, dot-files
    /// and Kubernetes' `..data` are ignored. An empty directory gives an empty ring.
    pub fn load_dir(dir: &Path) -> Result<KeyRing, Vec<KeyError>> {
        let mut errors = Vec::new();
        let entries = fs::read_dir(dir).map_err(|e| {
            vec![KeyError::new(
                dir,
                format!("cannot read the key directory: {e}"),
            )]
        })?;
        let mut files = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => {
                    let name = entry.file_name();
                    // A name that is not UTF-8 cannot be `<key-id>.<kind>`: not a key file.
                    let Some(name) = name.to_str() else { continue };
                    if name.starts_with('.') {
                        continue;
                    }
                    if let Some((id, kind)) = classify_name(name) {
                        files.push((id.to_owned(), kind, entry.path()));
                    }
                }
                Err(e) => errors.push(KeyError::new(
                    dir,
                    format!("cannot list the key directory: {e}"),
                )),
            }
        }
        // Sorted, so that errors come in the same order on every run.
        files.sort_by(|a, b| a.2.cmp(&b.2));

        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        for (id, kind, path) in files {
            if !is_valid_key_id(&id) {
                errors.push(KeyError::new(
                    &path,
                    format!("`{id}` is not a valid key id (1 to 64 characters of [A-Za-z0-9._-])"),
                ));
                continue;
            }
            let text = match read_key_file(&path) {
                Ok(text) => text,
                Err(message) => {
                    errors.push(KeyError::new(&path, message));
                    continue;
                }
            };
            let slot = found.entry(id).or_default();
            let parsed = match kind {
                Kind::Private => {
                    parse_ed25519_private(&text).map(|k| slot.private = Some((path.clone(), k)))
                }
                Kind::Public => {
                    parse_ed25519_public(&text).map(|k| slot.public = Some((path.clone(), k)))
                }
                Kind::Hmac => parse_hmac(&text).map(|k| slot.hmac = Some((path.clone(), k))),
            };
            if let Err(message) = parsed {
                errors.push(KeyError::new(&path, message));
            }
        }

        let mut keys = BTreeMap::new();
        for (id, f) in found {
            match (f.private, f.public, f.hmac) {
                (Some((_, signing)), public, None) => {
                    if let Some((path, verifying)) = public {
                        if verifying != signing.verifying_key() {
                            errors.push(KeyError::new(
                                &path,
                                format!("does not match the private key {id}.ed25519"),
                            ));
                            continue;
                        }
                    }
                    let verifying = signing.verifying_key();
                    let signing = Some(Box::new(signing));
                    keys.insert(id, Key::Ed25519 { verifying, signing });
                }
                (None, Some((_, verifying)), None) => {
                    keys.insert(
                        id,
                        Key::Ed25519 {
                            verifying,
                            signing: None,
                        },
                    );
                }
                (None, None, Some((_, mac))) => {
                    keys.insert(id, Key::Hmac(mac));
                }
                (private, public, Some((path, _))) if private.is_some() || public.is_some() => {
                    errors.push(KeyError::new(
                        &path,
                        format!("key id `{id}` is also used by an Ed25519 key file; key ids must be unique"),
                    ));
                }
                // Every file of this id failed to parse; its errors are already recorded.
                _ => {}
            }
        }
        if errors.is_empty() {
            Ok(KeyRing {
                keys: Arc::new(keys),
            })
        } else {
            Err(errors)
        }
    }

    /// Every key: its id, algorithm and whether it can sign, sorted by id.
    pub fn key_ids(&self) -> Vec<(String, Algorithm, bool)> {
        self.keys
            .iter()
            .map(|(id, key)| (id.clone(), key.algorithm(), key.can_sign()))
            .collect()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `key_id` is held, is of `algorithm`, and can sign (not a public key alone).
    pub fn can_sign(&self, key_id: &str, algorithm: Algorithm) -> bool {
        self.keys
            .get(key_id)
            .is_some_and(|k| k.algorithm() == algorithm && k.can_sign())
    }

    /// Signs with `key_id` (sets claims.key_id and algorithm). None if the key is missing,
    /// verify-only, or of another algorithm — or if the claims fail [`TagClaims::validate`]
    /// or the token would exceed [`MAX_TAG_LEN`].
    pub fn sign(
        &self,
        key_id: &str,
        algorithm: Algorithm,
        claims: &mut TagClaims,
    ) -> Option<String> {
        let key = self.keys.get(key_id)?;
        if key.algorithm() != algorithm || !key.can_sign() {
            return None;
        }
        claims.key_id = key_id.to_owned();
        claims.algorithm = algorithm;
        claims.validate().ok()?;
        let json = claims.to_payload_json().ok()?;
        let mut token = String::with_capacity(TAG_PREFIX.len() + json.len() * 4 / 3 + 90);
        token.push_str(TAG_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&json, &mut token);
        // The signature covers the ASCII bytes `sg1.<payload>`, as sent.
        let mut signature = String::with_capacity(90);
        if !key.sign_into(token.as_bytes(), &mut signature) {
            return None;
        }
        token.push('.');
        token.push_str(&signature);
        (token.len() <= MAX_TAG_LEN).then_some(token)
    }

    /// Decodes and verifies a token; never panics.
    ///
    /// Checks, in order: the shape (`sg1.<payload>.<signature>`), the payload (base64url, JSON,
    /// consistent fields), that the key id is known, that the claimed algorithm is the key's,
    /// and the signature.
    pub fn verify(&self, token: &str) -> Result<TagClaims, TagError> {
        let parts = split(token)?;
        let claims = decode_payload(parts.payload)?;
        let key = self
            .keys
            .get(&claims.key_id)
            .ok_or_else(|| TagError::UnknownKey(claims.key_id.clone()))?;
        if key.algorithm() != claims.algorithm {
            return Err(TagError::AlgorithmMismatch {
                key: claims.key_id.clone(),
                expected: key.algorithm(),
                found: claims.algorithm,
            });
        }
        let expected_len = claims.algorithm.encoded_signature_len();
        if parts.signature.len() < expected_len {
            return Err(TagError::Truncated);
        }
        if parts.signature.len() > expected_len {
            return Err(TagError::Malformed("the signature is too long".to_owned()));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(parts.signature)
            .map_err(|_| TagError::Malformed("the signature is not base64url".to_owned()))?;
        if key.verify(parts.signed.as_bytes(), &signature) {
            Ok(claims)
        } else {
            Err(TagError::BadSignature)
        }
    }

    /// The key itself, for tests that sign raw bytes.
    #[cfg(test)]
    pub(super) fn key(&self, key_id: &str) -> Option<&Key> {
        self.keys.get(key_id)
    }
}

/// `<id>.ed25519.pub`, `<id>.ed25519` or `<id>.hmac`; any other name is not a key file.
fn classify_name(name: &str) -> Option<(&str, Kind)> {
    if let Some(id) = name.strip_suffix(".ed25519.pub") {
        Some((id, Kind::Public))
    } else if let Some(id) = name.strip_suffix(".ed25519") {
        Some((id, Kind::Private))
    } else {
        name.strip_suffix(".hmac").map(|id| (id, Kind::Hmac))
    }
}

fn read_key_file(path: &Path) -> Result<String, String> {
    // `metadata` follows symlinks: Kubernetes mounts each key as a link into `..data`.
    let meta = fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".to_owned());
    }
    let file = fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "is larger than {MAX_KEY_FILE} bytes; not a key file"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "is not text (expected PEM or base64)".to_owned())
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT_BASE64
        .decode(compact)
        .map_err(|e| format!("is neither PEM nor base64 (standard alphabet): {e}"))
}

fn decode_32(text: &str) -> Result<[u8; 32], String> {
    let bytes = decode_base64(text)?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("decodes to {} bytes; an Ed25519 key is 32", bytes.len()))
}

fn parse_ed25519_private(text: &str) -> Result<SigningKey, String> {
    let text = text.trim();
    if text.starts_with("-----BEGIN PRIVATE KEY-----") {
        SigningKey::from_pkcs8_pem(text)
            .map_err(|e| format!("is not an Ed25519 PKCS#8 private key: {e}"))
    } else if text.starts_with("-----BEGIN PUBLIC KEY-----") {
        Err("holds a public key; name a public key file <id>.ed25519.pub".to_owned())
    } else if text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        Err(
            "is an OpenSSH key; write a PKCS#8 key with `openssl genpkey -algorithm ed25519`"
                .to_owned(),
        )
    } else if text.starts_with("-----BEGIN") {
        Err("has an unexpected PEM label; expected PRIVATE KEY (PKCS#8)".to_owned())
    } else {
        Ok(SigningKey::from_bytes(&decode_32(text)?))
    }
}

fn parse_ed25519_public(text: &str) -> Result<VerifyingKey, String> {
    let text = text.trim();
    let key = if text.starts_with("-----BEGIN PUBLIC KEY-----") {
        VerifyingKey::from_public_key_pem(text)
            .map_err(|e| format!("is not an Ed25519 public key (SPKI): {e}"))?
    } else if text.starts_with("-----BEGIN") && text.contains("PRIVATE KEY-----") {
        return Err(
            "holds a private key; name it <id>.ed25519 and share only the .pub file".to_owned(),
        );
    } else if text.starts_with("-----BEGIN") {
        return Err("has an unexpected PEM label; expected PUBLIC KEY (SPKI)".to_owned());
    } else {
        VerifyingKey::from_bytes(&decode_32(text)?)
            .map_err(|_| "is not a valid Ed25519 public key (not a curve point)".to_owned())?
    };
    if key.is_weak() {
        return Err("is a weak (small-order) Ed25519 public key".to_owned());
    }
    Ok(key)
}

fn parse_hmac(text: &str) -> Result<Hmac<Sha256>, String> {
    let secret = decode_base64(text)?;
    if secret.len() < MIN_HMAC_KEY {
        return Err(format!(
            "decodes to {} bytes; an HMAC-SHA256 secret needs at least {MIN_HMAC_KEY}",
            secret.len()
        ));
    }
    Hmac::<Sha256>::new_from_slice(&secret).map_err(|e| format!("unusable HMAC key: {e}"))
}

/// Writes a new key into `dir` as `<id>.<kind>` (and `<id>.ed25519.pub` for Ed25519), mode
/// 0600 for secrets, refusing to overwrite; returns the paths written. For `sluicegate tag
/// keygen`.
///
/// Creates `dir` (mode 0700) if it is missing. Refuses an id that any key file in `dir`
/// already uses, since the ring requires unique ids. Ed25519 keys are written as PEM
/// (PKCS#8 and SPKI, as OpenSSL writes them), HMAC secrets as 32 random bytes in base64.
pub fn generate_key(
    dir: &Path,
    key_id: &str,
    algorithm: Algorithm,
) -> Result<Vec<PathBuf>, KeyError> {
    if !is_valid_key_id(key_id) {
        return Err(KeyError::new(
            &dir.join(key_id),
            "not a valid key id (1 to 64 characters of [A-Za-z0-9._-])",
        ));
    }
    create_dir(dir)?;
    for suffix in ["ed25519", "ed25519.pub", "hmac"] {
        let path = dir.join(format!("{key_id}.{suffix}"));
        if fs::symlink_metadata(&path).is_ok() {
            return Err(KeyError::new(
                &path,
                "already exists; never reuse a key id, pick a new one",
            ));
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| KeyError::new(dir, format!("no randomness from the OS: {e}")))?;
    match algorithm {
        Algorithm::Ed25519 => {
            let signing = SigningKey::from_bytes(&seed);
            // Without the public key in it, as `openssl genpkey` writes it (PKCS#8 v1).
            let keypair = KeypairBytes {
                secret_key: seed,
                public_key: None,
            };
            let private_path = dir.join(format!("{key_id}.ed25519"));
            let public_path = dir.join(format!("{key_id}.ed25519.pub"));
            let private_pem = keypair
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| KeyError::new(&private_path, format!("cannot encode: {e}")))?;
            let public_pem = signing
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| KeyError::new(&public_path, format!("cannot encode: {e}")))?;
            write_new(&private_path, private_pem.as_bytes(), 0o600)?;
            if let Err(e) = write_new(&public_path, public_pem.as_bytes(), 0o644) {
                // Leave no half-written key behind.
                let _ = fs::remove_file(&private_path);
                return Err(e);
            }
            Ok(vec![private_path, public_path])
        }
        Algorithm::HmacSha256 => {
            let path = dir.join(format!("{key_id}.hmac"));
            let mut text = base64::engine::general_purpose::STANDARD.encode(seed);
            text.push('\n');
            write_new(&path, text.as_bytes(), 0o600)?;
            Ok(vec![path])
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), KeyError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| KeyError::new(dir, format!("cannot create the key directory: {e}")))
}

/// Creates `path` (never overwriting) with `mode`, writes `bytes` and syncs them.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .map_err(|e| KeyError::new(path, format!("cannot create: {e}")))?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(KeyError::new(path, format!("cannot write: {e}")));
    }
    Ok(())
}
