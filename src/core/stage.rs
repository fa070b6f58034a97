//! The account lifecycle as types: `Loaded → UsageChecked → Selected → TokenFresh →
//! Validated`, or `Failed`.
//!
//! Each stage holds exactly what later stages need, its fields are private, and a
//! transition consumes the stage before it. The only way to a [`TokenAnswer`] is
//! [`Validated::into_answer`], and the only way to a `Validated` is a 200 with a model
//! list from the validation call for that very token.

use super::change::Change;
use super::effect::{Effect, Reply};
use super::verdict::{classify, rejects_only_the_token, Call, Verdict};
use super::wire::{self, NewTokens};
use crate::model::{Account, Claims, Secret, Usage, Window};
use crate::settings::Policy;

/// Why an account was passed over in this request.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    Disabled,
    WeeklyExhausted(Window),
    FiveHourExhausted {
        window: Window,
        threshold: f64,
    },
    /// Usage was stale, the refresh failed, and nothing was stored.
    UsageUnavailable(String),
    /// Refresh or validation failed transiently.
    UpstreamUnavailable(String),
    /// The upstream declared it invalid: it was moved to failed.json.
    Invalid(String),
    /// Another writer changed or removed it while this request ran.
    ChangedMeanwhile,
    /// It could not be moved to failed.json; it stays in accounts.json.
    NotMoved(String),
}

impl Reason {
    /// When the account will have quota again, if it is only exhausted.
    pub fn exhausted_until(&self) -> Option<i64> {
        match self {
            Reason::WeeklyExhausted(w) | Reason::FiveHourExhausted { window: w, .. } => {
                Some(w.reset_at)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Disabled => write!(f, "disabled"),
            Reason::WeeklyExhausted(w) => write!(
                f,
                "weekly window exhausted ({}%), resets at {}",
                w.used_percent, w.reset_at
            ),
            Reason::FiveHourExhausted { window, threshold } => write!(
                f,
                "5-hour window at {}% (limit {threshold}%), resets at {}",
                window.used_percent, window.reset_at
            ),
            Reason::UsageUnavailable(why) => write!(f, "usage unavailable: {why}"),
            Reason::UpstreamUnavailable(why) => write!(f, "upstream unavailable: {why}"),
            Reason::Invalid(why) => write!(f, "invalid ({why}), moved to failed.json"),
            Reason::ChangedMeanwhile => write!(f, "changed by another writer during the request"),
            Reason::NotMoved(why) => write!(f, "invalid but not moved: {why}"),
        }
    }
}

/// Why a due token is used without a refresh.
const DUE_UNREFRESHED: &str =
    "another writer stored it, and this request already sent its one refresh for the account";

fn account_id(token: &Secret) -> Option<String> {
    Claims::of(token.expose()).account_id
}

/// How far ahead of a request's clock a `usage_checked_at` may lie and still count as
/// "now": stamps are whole seconds, a request reads its clock just before the file, and
/// another writer (a helper, a second gibby) may stamp the second that has just begun.
/// Without it, usage a helper had just written would read as stale, be fetched again, and
/// replace the helper's figures.
pub const CLOCK_SLACK_SECONDS: i64 = 2;

/// An account as read from accounts.json in this request.
#[derive(Debug)]
pub struct Loaded {
    account: Account,
}

impl Loaded {
    pub fn new(account: Account) -> Self {
        Loaded { account }
    }

    /// Stored usage that is still fresh is trusted as it is; stale usage must be fetched.
    /// A check stamped in the future is stale, past [`CLOCK_SLACK_SECONDS`].
    #[allow(clippy::result_large_err)] // both sides own the account; boxing buys nothing
    pub fn check_usage(self, now: i64, policy: &Policy) -> Result<UsageChecked, UsageDue> {
        let a = &self.account;
        let fresh = match (&a.usage, a.usage_checked_at) {
            (Some(usage), Some(checked)) => {
                checked <= now.saturating_add(CLOCK_SLACK_SECONDS)
                    && now.saturating_sub(checked) <= policy.usage_stale_seconds
                    && [&usage.primary, &usage.secondary]
                        .into_iter()
                        .flatten()
                        .all(|w| w.reset_at > now)
            }
            _ => false,
        };
        if fresh {
            let usage = a.usage.clone();
            Ok(UsageChecked {
                account: self.account,
                usage,
                source: UsageSource::Stored,
                refresh_failed: None,
            })
        } else {
            Err(UsageDue {
                account: self.account,
                refresh_tried: false,
                refresh_failed: None,
            })
        }
    }
}

/// How the usage a decision rests on was obtained.
#[derive(Clone, Debug, PartialEq)]
pub enum UsageSource {
    /// Stored and fresh.
    Stored,
    /// Fetched in this request.
    Fetched,
    /// Stale, the fetch failed transiently, and the stored figures stand in.
    StoredFallback(String),
    /// Stale, the fetch failed, nothing stored.
    Unavailable(String),
}

/// An account whose usage must be fetched before it can be judged.
#[derive(Debug)]
pub struct UsageDue {
    account: Account,
    /// This is the retry after a refresh (or a refresh attempt) for this request.
    refresh_tried: bool,
    /// That refresh failed transiently: the refresh token is not sent again in this
    /// request (it may have been spent upstream; a second use would read as reuse).
    refresh_failed: Option<String>,
}

/// What a usage answer turned an account into.
// Short-lived and consumed at once; every variant owns an account anyway.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per usage answer, consumed at once: boxing buys nothing"
)]
pub enum UsageAnswer {
    /// With the change that persists the usage, when it was fetched.
    Checked(UsageChecked, Option<Change>),
    Failed(Failed),
    /// The token is due and was rejected: refresh it, then ask again.
    RefreshFirst(RefreshDue),
}

impl UsageDue {
    pub fn email(&self) -> &str {
        &self.account.email
    }

    pub fn access_token(&self) -> &Secret {
        &self.account.access_token
    }

    pub fn effect(&self) -> Effect {
        Effect::FetchUsage {
            email: self.account.email.clone(),
            access_token: self.account.access_token.clone(),
            account_id: account_id(&self.account.access_token),
        }
    }

    pub fn answered(self, reply: &Reply, now: i64) -> UsageAnswer {
        let problem = match classify(Call::Usage, reply) {
            Verdict::Success(body) => match wire::usage_from_body(body, now) {
                Some(usage) => {
                    let a = &self.account;
                    let change = Change::SetUsage {
                        email: a.email.clone(),
                        access_token: a.access_token.clone(),
                        seen: (a.usage.clone(), a.usage_checked_at),
                        usage: usage.clone(),
                        checked_at: now,
                    };
                    return UsageAnswer::Checked(
                        UsageChecked {
                            account: self.account,
                            usage: Some(usage),
                            source: UsageSource::Fetched,
                            refresh_failed: self.refresh_failed,
                        },
                        Some(change),
                    );
                }
                None => "usage answer did not parse".to_owned(),
            },
            // A token due for refresh may be rejected (401) only because it is old: one
            // refresh and one retry come before any verdict. A 402/403 with a dead code
            // is about the account, not the token's age: a verdict at once.
            Verdict::Invalid(_)
                if token_due(&self.account, now)
                    && !self.refresh_tried
                    && rejects_only_the_token(reply) =>
            {
                return UsageAnswer::RefreshFirst(RefreshDue {
                    account: self.account,
                })
            }
            // Still due: the refresh failed only transiently, so this is no verdict.
            Verdict::Invalid(why)
                if token_due(&self.account, now) && rejects_only_the_token(reply) =>
            {
                format!("{why} for a token whose refresh failed")
            }
            Verdict::Invalid(why) => {
                return UsageAnswer::Failed(Failed {
                    account: self.account,
                    why: format!("usage: {why}"),
                })
            }
            Verdict::Transient(why) => why,
        };
        let usage = self.account.usage.clone();
        let source = match usage {
            Some(_) => UsageSource::StoredFallback(problem),
            None => UsageSource::Unavailable(problem),
        };
        UsageAnswer::Checked(
            UsageChecked {
                account: self.account,
                usage,
                source,
                refresh_failed: self.refresh_failed,
            },
            None,
        )
    }
}

/// A token is due for refresh when `now` has reached `token_refresh_at` (or there is none),
/// unless it cannot be refreshed at all (empty refresh token).
pub fn token_due(a: &Account, now: i64) -> bool {
    !a.refresh_token.is_empty() && a.token_refresh_at.is_none_or(|at| now >= at)
}

/// An account whose usage is known for this request.
#[derive(Debug)]
pub struct UsageChecked {
    account: Account,
    usage: Option<Usage>,
    source: UsageSource,
    /// A refresh of this token failed transiently earlier in this request.
    refresh_failed: Option<String>,
}

impl UsageChecked {
    pub fn email(&self) -> &str {
        &self.account.email
    }

    /// The token the usage was judged with; a usage change applies only while it stands.
    pub fn access_token(&self) -> &Secret {
        &self.account.access_token
    }

    pub fn source(&self) -> &UsageSource {
        &self.source
    }

    /// The short window's figure; a missing window counts as 0.
    pub fn primary_percent(&self) -> f64 {
        self.usage
            .as_ref()
            .and_then(|u| u.primary.as_ref())
            .map_or(0.0, Window::percent)
    }

    /// Usable: not disabled, weekly under 100, 5-hour under the threshold.
    pub fn usable(&self, policy: &Policy) -> Result<(), Reason> {
        if self.account.disabled {
            return Err(Reason::Disabled);
        }
        let usage = match (&self.usage, &self.source) {
            (Some(usage), _) => usage,
            (None, UsageSource::Unavailable(why)) => {
                return Err(Reason::UsageUnavailable(why.clone()))
            }
            (None, _) => return Ok(()),
        };
        if let Some(w) = usage.secondary.as_ref().filter(|w| w.percent() >= 100.0) {
            return Err(Reason::WeeklyExhausted(w.clone()));
        }
        if let Some(w) = usage
            .primary
            .as_ref()
            .filter(|w| w.percent() >= policy.exhausted_threshold)
        {
            return Err(Reason::FiveHourExhausted {
                window: w.clone(),
                threshold: policy.exhausted_threshold,
            });
        }
        Ok(())
    }

    /// Only the selection rule calls this, for the account it picked.
    pub(super) fn select(self) -> Selected {
        Selected {
            account: self.account,
            refresh_failed: self.refresh_failed,
        }
    }
}

/// The account the selection rule picked.
#[derive(Debug)]
pub struct Selected {
    account: Account,
    refresh_failed: Option<String>,
}

impl Selected {
    pub fn email(&self) -> &str {
        &self.account.email
    }

    /// A token not yet due is used as it is, and so is one that cannot be refreshed
    /// (empty refresh token) until it is rejected, and one whose refresh already failed
    /// transiently in this request (as after a refresh that fails now).
    #[allow(clippy::result_large_err)] // both sides own the account; boxing buys nothing
    pub fn check_token(self, now: i64) -> Result<TokenFresh, RefreshDue> {
        if self.account.refresh_token.is_empty() {
            return Ok(TokenFresh::new(self.account, TokenOrigin::NotRefreshable));
        }
        if let Some(why) = self.refresh_failed {
            return Ok(TokenFresh::new(
                self.account,
                TokenOrigin::RefreshFailed(why),
            ));
        }
        if token_due(&self.account, now) {
            Err(RefreshDue {
                account: self.account,
            })
        } else {
            Ok(TokenFresh::new(self.account, TokenOrigin::NotDue))
        }
    }
}

/// A selected account whose token is due for refresh.
#[derive(Debug)]
pub struct RefreshDue {
    account: Account,
}

#[derive(Debug)]
pub enum RefreshAnswer {
    Refreshed(TokenFresh, NewTokens),
    Failed(Failed),
    /// A transient failure: the old token is tried as it is.
    Kept(TokenFresh),
}

impl RefreshDue {
    pub fn email(&self) -> &str {
        &self.account.email
    }

    pub fn refresh_token(&self) -> &Secret {
        &self.account.refresh_token
    }

    pub fn effect(&self) -> Effect {
        Effect::RefreshToken {
            email: self.account.email.clone(),
            refresh_token: self.account.refresh_token.clone(),
        }
    }

    /// Another writer refreshed this account meanwhile: use its tokens, never ours again.
    /// Theirs may be due themselves: see [`adopt`].
    #[allow(clippy::result_large_err)] // both sides own the account; boxing buys nothing
    pub fn rotated_elsewhere(
        self,
        stored: Account,
        now: i64,
        may_refresh: bool,
    ) -> Result<TokenFresh, RefreshDue> {
        debug_assert_eq!(stored.email, self.account.email);
        adopt(stored, now, may_refresh)
    }

    /// This request already sent a refresh for the account: the token is used as it is,
    /// and a rejection of it is no verdict (it was due and could not be refreshed).
    pub fn without_refresh(self) -> TokenFresh {
        TokenFresh::new(self.account, TokenOrigin::DueUnrefreshed)
    }

    pub fn answered(self, reply: &Reply, now: i64) -> RefreshAnswer {
        let why = match classify(Call::Refresh, reply) {
            Verdict::Success(body) => match wire::tokens_from_body(body, now) {
                Some(tokens) => {
                    let mut account = self.account;
                    account.access_token = tokens.access_token.clone();
                    if let Some(rt) = &tokens.refresh_token {
                        account.refresh_token = rt.clone();
                    }
                    account.token_refresh_at = Some(tokens.token_refresh_at);
                    return RefreshAnswer::Refreshed(
                        TokenFresh::new(account, TokenOrigin::Refreshed),
                        tokens,
                    );
                }
                None => "refresh answer did not parse".to_owned(),
            },
            Verdict::Invalid(why) => {
                return RefreshAnswer::Failed(Failed {
                    account: self.account,
                    why: format!("refresh: {why}"),
                })
            }
            Verdict::Transient(why) => why,
        };
        RefreshAnswer::Kept(TokenFresh::new(
            self.account,
            TokenOrigin::RefreshFailed(why),
        ))
    }
}

/// Tokens another writer stored meanwhile are checked like any others: when they are due
/// (a helper wrote no `token_refresh_at`, or one in the past) they are refreshed first, as a
/// selected account's would be, so that a 401 for them is not taken for a dead account.
/// At most one refresh call per account and request: when this request already sent one,
/// the due token is used as it is and a rejection of it is no verdict.
#[allow(clippy::result_large_err)] // both sides own the account; boxing buys nothing
fn adopt(stored: Account, now: i64, may_refresh: bool) -> Result<TokenFresh, RefreshDue> {
    if !token_due(&stored, now) {
        Ok(TokenFresh::new(stored, TokenOrigin::RotatedElsewhere))
    } else if may_refresh {
        Err(RefreshDue { account: stored })
    } else {
        Ok(TokenFresh::new(stored, TokenOrigin::DueUnrefreshed))
    }
}

/// Where the token about to be validated came from.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenOrigin {
    NotDue,
    NotRefreshable,
    Refreshed,
    RotatedElsewhere,
    /// Due, but the refresh failed transiently; a rejection is then no verdict.
    RefreshFailed(String),
    /// Due (stored so by another writer), but this request already sent its one refresh
    /// for the account; a rejection is then no verdict.
    DueUnrefreshed,
}

/// An account with a token that is as fresh as it can be made now.
#[derive(Debug)]
pub struct TokenFresh {
    account: Account,
    origin: TokenOrigin,
    /// Read from the token once: validation sends the account id, the answer carries it
    /// and the token's end (`exp`).
    account_id: Option<String>,
    expires_at: Option<i64>,
}

#[derive(Debug)]
pub enum ValidationAnswer {
    Valid(Validated),
    Failed(Failed),
    Transient(Reason),
}

impl TokenFresh {
    fn new(account: Account, origin: TokenOrigin) -> Self {
        let claims = Claims::of(account.access_token.expose());
        TokenFresh {
            account,
            origin,
            account_id: claims.account_id,
            expires_at: claims.exp,
        }
    }

    pub fn email(&self) -> &str {
        &self.account.email
    }

    pub fn access_token(&self) -> &Secret {
        &self.account.access_token
    }

    pub fn origin(&self) -> &TokenOrigin {
        &self.origin
    }

    /// Usage rejected the token before this refresh: ask again, once.
    pub fn retry_usage(self) -> UsageDue {
        UsageDue {
            account: self.account,
            refresh_tried: true,
            refresh_failed: match self.origin {
                TokenOrigin::RefreshFailed(why) => Some(why),
                TokenOrigin::DueUnrefreshed => Some(DUE_UNREFRESHED.into()),
                _ => None,
            },
        }
    }

    pub fn effect(&self) -> Effect {
        Effect::Validate {
            email: self.account.email.clone(),
            access_token: self.account.access_token.clone(),
            account_id: self.account_id.clone(),
        }
    }

    pub fn answered(self, reply: &Reply) -> ValidationAnswer {
        match classify(Call::Validation, reply) {
            Verdict::Success(body) if wire::models_listed(body) => {
                ValidationAnswer::Valid(Validated {
                    email: self.account.email,
                    access_token: self.account.access_token,
                    account_id: self.account_id,
                    expires_at: self.expires_at,
                })
            }
            Verdict::Success(_) => ValidationAnswer::Transient(Reason::UpstreamUnavailable(
                "validation answer did not parse".into(),
            )),
            Verdict::Invalid(why) => match self.origin {
                TokenOrigin::RefreshFailed(refresh) if rejects_only_the_token(reply) => {
                    ValidationAnswer::Transient(Reason::UpstreamUnavailable(format!(
                        "validation: {why} after a failed refresh ({refresh})"
                    )))
                }
                TokenOrigin::DueUnrefreshed if rejects_only_the_token(reply) => {
                    ValidationAnswer::Transient(Reason::UpstreamUnavailable(format!(
                        "validation: {why} for a token that is due ({DUE_UNREFRESHED})"
                    )))
                }
                _ => ValidationAnswer::Failed(Failed {
                    account: self.account,
                    why: format!("validation: {why}"),
                }),
            },
            Verdict::Transient(why) => ValidationAnswer::Transient(Reason::UpstreamUnavailable(
                format!("validation: {why}"),
            )),
        }
    }
}

/// An account whose token the upstream accepted just now.
#[derive(Debug)]
pub struct Validated {
    email: String,
    access_token: Secret,
    account_id: Option<String>,
    expires_at: Option<i64>,
}

impl Validated {
    pub fn into_answer(self) -> TokenAnswer {
        TokenAnswer {
            email: self.email,
            access_token: self.access_token,
            account_id: self.account_id,
            expires_at: self.expires_at,
        }
    }
}

/// The body of a 200 from `/token`. Only [`Validated::into_answer`] makes one.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenAnswer {
    email: String,
    access_token: Secret,
    account_id: Option<String>,
    expires_at: Option<i64>,
}

impl TokenAnswer {
    pub fn email(&self) -> &str {
        &self.email
    }

    pub fn access_token(&self) -> &Secret {
        &self.access_token
    }
}

/// An account the upstream declared invalid, with the tokens it was judged by.
#[derive(Debug)]
pub struct Failed {
    account: Account,
    why: String,
}

impl Failed {
    pub fn email(&self) -> &str {
        &self.account.email
    }

    pub fn why(&self) -> &str {
        &self.why
    }

    /// Another writer gave the account new tokens while it was being judged: the verdict
    /// was about the old ones, so the new ones are tried (refreshed first when due: see
    /// [`adopt`]).
    #[allow(clippy::result_large_err)] // both sides own the account; boxing buys nothing
    pub fn rotated_elsewhere(
        self,
        stored: Account,
        now: i64,
        may_refresh: bool,
    ) -> Result<TokenFresh, RefreshDue> {
        debug_assert_eq!(stored.email, self.account.email);
        adopt(stored, now, may_refresh)
    }

    /// The same account in a fresh read: same email and the very tokens that were judged.
    /// Anything else was re-added or rotated meanwhile and must stay.
    pub fn matches(&self, stored: &Account) -> bool {
        stored.email == self.account.email
            && stored.access_token == self.account.access_token
            && stored.refresh_token == self.account.refresh_token
    }
}
